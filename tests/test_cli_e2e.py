"""The command line end to end on a model of the user's own (issue 16): a Conv3d+BatchNorm net written
to ``mymodel.py`` in a temporary folder, its trained weights saved as a state_dict, then, each in a new
process run from that folder: ``tucker-fx compress --checkpoint --save``, ``tucker-fx bench`` against
the original, ``tucker-fx export --format pt2|onnx``; the artifacts are loaded and run here and compared
with the compressed and the original model. Bad option values: exit code 2 and one line naming the option.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tucker_fx.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MODEL = textwrap.dedent('''
    import torch.nn as nn


    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
            nn.Conv3d(16, 32, 3, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 5),
        )
''')
SHAPE = (1, 3, 6, 12, 12)


def _module_from(folder: Path):
    sys.path.insert(0, str(folder))
    try:
        import importlib

        sys.modules.pop("mymodel", None)
        return importlib.import_module("mymodel")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mymodel", None)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """``mymodel.py`` and ``model.pt`` (a state_dict after a few training steps, BatchNorm statistics included)."""
    folder = tmp_path_factory.mktemp("own_model")
    (folder / "mymodel.py").write_text(MODEL)
    torch.manual_seed(0)
    model = _module_from(folder).make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):
        x, y = torch.randn(8, *SHAPE[1:]), torch.randint(0, 5, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.eval().state_dict(), folder / "model.pt")
    return folder


def _cli(folder: Path, *args: str, script: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI in a new process from ``folder``: the console script (whose sys.path lacks the current
    folder, as a user's shell has it) or ``python -m tucker_fx.cli``."""
    exe = shutil.which("tucker-fx", path=str(Path(sys.executable).parent)) if script else None
    cmd = [exe] if exe else [sys.executable, "-m", "tucker_fx.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([*cmd, *args], cwd=folder, capture_output=True, text=True, env=env, timeout=300)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm())


@pytest.fixture(scope="module")
def saved(project: Path) -> Path:
    r = _cli(project, "compress", "mymodel:make", "--checkpoint", "model.pt", "--input-shape",
             ",".join(map(str, SHAPE)), "--rank", "0.5", "--save", "out", "--quiet", "--no-compact", script=True)
    assert r.returncode == 0, r.stderr
    assert "| layer |" in r.stdout and "saved the compressed model to out" in r.stderr
    assert {p.name for p in (project / "out").iterdir()} >= {"tucker_fx.json", "weights.pt", "tucker_fx_cli.json"}
    return project / "out"


def _original_and_loaded(project: Path, saved: Path):
    import tucker_fx

    mod = _module_from(project)
    original = mod.make().eval()
    original.load_state_dict(torch.load(project / "model.pt", weights_only=True))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    loaded = tucker_fx.load(saved, mod.make().eval(), x)
    return original, loaded.module, x


def test_compress_saves_a_model_that_reloads_and_is_close_to_the_original(project, saved):
    original, compressed, x = _original_and_loaded(project, saved)
    with torch.no_grad():
        err = _rel(original(x), compressed(x))
    assert err < 0.8  # rank 0.5 of each mode on lightly trained weights: an approximation, not garbage
    facts = json.loads((saved / "tucker_fx_cli.json").read_text())
    assert facts["model"] == "mymodel:make" and facts["checkpoint"].endswith("model.pt")


def test_bench_times_the_saved_model_against_the_original(project, saved):
    r = _cli(project, "bench", "out", "--repeats", "2", "--json", "bench.json")
    assert r.returncode == 0, r.stderr
    assert "original" in r.stdout and "saved (out)" in r.stdout
    data = json.loads((project / "bench.json").read_text())
    assert set(data["variants"]) == {"original", "saved (out)"}
    assert data["variants"]["saved (out)"]["params"] < data["variants"]["original"]["params"]
    assert data["variants"]["saved (out)"]["rel_error"] < 0.8


def test_export_pt2_with_a_dynamic_batch_runs_like_the_compressed_model(project, saved):
    r = _cli(project, "export", "out", "--format", "pt2", "--dynamic-batch")
    assert r.returncode == 0, r.stderr
    assert "wrote out/model.pt2" in r.stdout and "any batch" in r.stdout
    _, compressed, x = _original_and_loaded(project, saved)
    program = torch.export.load(str(saved / "model.pt2")).module()
    x4 = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        assert _rel(compressed(x4), program(x4)) < 1e-5
        assert _rel(compressed(x), program(x)) < 1e-5


@pytest.mark.slow  # the ONNX exporter: ~10-20 s
def test_export_onnx_runs_in_onnxruntime(project, saved):
    import onnxruntime as ort

    r = _cli(project, "export", "out", "--format", "onnx", "--output", "model.onnx")
    assert r.returncode == 0, r.stderr
    assert "checked against the PyTorch model" in r.stdout
    original, compressed, x = _original_and_loaded(project, saved)
    session = ort.InferenceSession(str(project / "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert _rel(compressed(x), torch.from_numpy(out)) < 1e-5
        assert _rel(original(x), torch.from_numpy(out)) < 0.8


@pytest.mark.parametrize("args, option", [
    (["compress", "conv2d", "--rank", "abc"], "--rank"),
    (["compress", "conv2d", "--rank", "1.5"], "--rank"),
    (["compress", "conv2d", "--ranks", "c1"], "--ranks"),
    (["compress", "conv2d", "--dtype", "float8"], "--dtype"),
    (["compress", "conv2d", "--input-shape", "1,x"], "--input-shape"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["export", "out", "--format", "tflite"], "--format"),
    (["demo", "--repeats", "-1"], "--repeats"),
])
def test_bad_values_give_one_line_naming_the_option(capsys, args, option):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and option in err and "expected" in err or "invalid choice" in err


def test_errors_after_parsing_are_one_line_too(tmp_path, capsys):
    assert main(["compress", "conv2d", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--checkpoint" in err
    assert main(["export", str(tmp_path)]) == 2
    assert "tucker_fx.json" in capsys.readouterr().err


def test_a_bad_value_in_a_new_process_exits_2_with_one_line(project):
    r = _cli(project, "compress", "mymodel:make", "--rank", "abc")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--rank" in r.stderr


def test_version_and_help_show_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "tucker-fx" in capsys.readouterr().out
    for command in ("analyze", "compress", "bench", "export", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default:" in text, command
