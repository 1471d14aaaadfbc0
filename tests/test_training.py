"""finetune / evaluate, the tiny end-to-end pipeline, tucker-fx train, and the MLP example."""

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import tucker_fx
from tucker_fx.cli import main
from tucker_fx.data import SyntheticThetis, have_sklearn, thetis_net_for
from tucker_fx.models import thetis_paper_config
from tucker_fx.reporting.train_demo import format_train_demo, plot_train_demo, train_demo
from tucker_fx.training import EvalResult, distillation_loss, evaluate, finetune, mlp

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _toy(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = ((x[:, 0] + x[:, 1]) > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


def _loader(ds, bs=16, shuffle=True):
    return DataLoader(ds, batch_size=bs, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


# ---- evaluate -------------------------------------------------------------------------------

def test_evaluate_counts_per_class():
    net = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    y = torch.tensor([0, 1, 0, 0, 1])
    r = evaluate(net, DataLoader(TensorDataset(x, y), batch_size=2), num_classes=3)
    assert isinstance(r, EvalResult)
    assert (r.correct, r.total, r.counts) == (3, 5, (3, 2, 0))
    assert r.accuracy == pytest.approx(0.6)
    assert r.per_class[:2] == pytest.approx((2 / 3, 0.5)) and math.isnan(r.per_class[2])
    assert r.to_dict()["per_class"][2] is None


def test_evaluate_leaves_the_model_alone():
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    net[2].eval()  # mixed modes must come back as they were
    state = {k: v.clone() for k, v in net.state_dict().items()}
    evaluate(net, _loader(_toy()))
    assert net.training and net[1].training and not net[2].training
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_evaluate_errors():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        evaluate("net", [])
    with pytest.raises(TypeError, match=r"expected batches of \(inputs, targets\)"):
        evaluate(nn.Linear(6, 3), [torch.randn(2, 6)])
    with pytest.raises(ValueError, match="gave no samples"):
        evaluate(nn.Linear(6, 3), [])


# ---- finetune -------------------------------------------------------------------------------

def test_finetune_lowers_the_loss_and_restores_mode():
    net = mlp([6, 16, 3], seed=0).eval()
    before = evaluate(net, _loader(_toy()))
    stream = io.StringIO()
    hist = finetune(net, _loader(_toy()), epochs=5, lr=0.02, seed=0, stream=stream)
    after = evaluate(net, _loader(_toy()))
    assert hist.losses[-1] < hist.losses[0] and after.loss < before.loss and after.accuracy > before.accuracy
    assert hist.steps == 30 and hist.samples == 5 * 96 and hist.world_size == 1
    assert not net.training
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("finetune epoch 5/5 [####################] 6/6 loss")


def test_finetune_quiet_max_steps_callback_cosine():
    net, stream = mlp([6, 3], seed=0), io.StringIO()
    hist = finetune(net, _loader(_toy()), epochs=3, max_steps=4, quiet=True, stream=stream, schedule="cosine")
    assert hist.steps == 4 and stream.getvalue() == ""
    seen = []
    hist = finetune(net, _loader(_toy()), epochs=5, quiet=True, callback=lambda e, h: seen.append(e) or e == 2)
    assert seen == [1, 2] and len(hist.losses) == 2


def test_finetune_distils_and_keeps_the_teacher():
    teacher = mlp([6, 32, 3], seed=1)
    finetune(teacher, _loader(_toy()), epochs=10, lr=0.02, quiet=True, seed=0)
    teacher.eval()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = mlp([6, 4, 3], seed=2)
    hist = finetune(student, _loader(_toy()), epochs=10, lr=0.02, teacher=teacher, distill_weight=0.7,
                    quiet=True, seed=0)
    assert hist.losses[-1] < hist.losses[0]
    assert not teacher.training and all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())


def test_distillation_loss_matches_its_formula():
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    T = 2.0
    kl = (t.div(T).softmax(1) * (t.div(T).log_softmax(1) - s.div(T).log_softmax(1))).sum(1).mean()
    expected = 0.6 * nn.functional.cross_entropy(s, y) + 0.4 * T * T * kl
    assert distillation_loss(s, t, y, weight=0.4, temperature=T).item() == pytest.approx(expected.item(), rel=1e-5)


def test_finetune_errors():
    loader = _loader(_toy())
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        finetune(nn.Linear(6, 3), loader, epochs=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        finetune(nn.Linear(6, 3), loader, lr=-1)
    with pytest.raises(ValueError, match="optimizer must be 'adam'"):
        finetune(nn.Linear(6, 3), loader, optimizer="lion", quiet=True)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        finetune(nn.Linear(6, 3), loader, teacher="big")
    frozen = nn.Linear(6, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        finetune(frozen, loader)
    with pytest.raises(TypeError, match=r"expected batches of \(inputs, targets\)"):
        finetune(nn.Linear(6, 3), [torch.randn(4, 6)], quiet=True)


def test_finetune_trains_fft_lowered_layers():
    """An FFT-lowered conv trains, and its cached kernel spectrum follows the updated weight."""
    from tucker_fx.kernels import FFTConv

    torch.manual_seed(0)
    fft = FFTConv.from_conv(nn.Conv2d(2, 3, 5, padding=2))
    net = nn.Sequential(fft, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 2))
    x = torch.randn(32, 2, 6, 6)
    data = TensorDataset(x, (x[:, 0, :3].sum((1, 2)) > 0).long())
    w0 = fft.weight.detach().clone()
    hist = finetune(net, DataLoader(data, batch_size=8), epochs=5, lr=0.01, quiet=True)
    assert hist.losses[-1] < hist.losses[0] and not torch.equal(fft.weight, w0)
    with torch.no_grad():
        direct = nn.functional.conv2d(x, fft.weight, fft.bias, padding=2)
        torch.testing.assert_close(fft(x), direct, atol=1e-4, rtol=1e-4)


# ---- the whole pipeline, tiny ---------------------------------------------------------------

def test_tiny_pipeline_train_compress_finetune():
    """Training lowers the loss, compression lowers the weights, fine-tuning keeps train accuracy."""
    torch.manual_seed(0)
    train = SyntheticThetis(16, resolution=(32, 40), frames=8, seed=0)
    loader, eval_loader = _loader(train, bs=4), DataLoader(train, batch_size=8)
    model = thetis_net_for(8, 32, 40, seed=0)
    start = evaluate(model, eval_loader)
    finetune(model, loader, epochs=3, lr=2e-3, quiet=True, seed=0)
    trained = evaluate(model, eval_loader)
    assert trained.loss < start.loss
    model.eval()
    x = torch.randn(1, 4, 8, 32, 40)
    result = tucker_fx.compress(model, x, config=thetis_paper_config(lowering="none", progress=False))
    assert result.after.total_params < result.before.total_params
    assert isinstance(result.module, torch.fx.GraphModule)
    compressed = evaluate(result.module, eval_loader)
    result.module.requires_grad_(True)  # compress leaves the factors frozen (blocks.py); train them all
    finetune(result.module, loader, epochs=4, lr=1e-3, teacher=model, quiet=True, seed=0)
    tuned = evaluate(result.module, eval_loader)
    assert tuned.accuracy >= compressed.accuracy and tuned.loss < compressed.loss


def test_train_demo_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "train.json"
    rc = main(["train", "--resolution", "32x40", "--frames", "8", "--train-size", "8", "--test-size", "4",
               "--max-epochs", "1", "--finetune-epochs", "1", "--repeats", "1", "--no-plot", "--quiet",
               "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| paper ranks |" in out and "| evbmf ranks |" in out and "Linear probe" in out
    data = json.loads(path.read_text())
    assert {c["name"] for c in data["compressed"]} == {"evbmf", "paper"}
    paper = next(c for c in data["compressed"] if c["name"] == "paper")
    assert [row["ranks"] for row in paper["plan"]] == [[2, 2], [2, 3], [4, 7], [1], None]
    assert data["original"]["params"] > paper["params_after"] and paper["params_ratio"] > 1
    assert 0.0 <= paper["after_finetune"]["test"]["accuracy"] <= 1.0 and data["ms"]["original"] > 0


def test_train_demo_errors():
    with pytest.raises(ValueError, match="target must be an accuracy"):
        train_demo(target=90)
    with pytest.raises(ValueError, match="expected frames >= 8"):
        train_demo(resolution=(16, 16), plot=None, quiet=True)


def test_plot_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    r = train_demo(resolution=(32, 40), frames=8, train_size=4, test_size=2, max_epochs=1, finetune_epochs=1,
                   repeats=1, plot=None, probe=False, quiet=True)
    assert "Ranks per layer" in format_train_demo(r)
    path = plot_train_demo(r, str(tmp_path / "p.png"))
    assert path and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the MLP example in the docs ------------------------------------------------------------

@pytest.mark.skipif(not have_sklearn(), reason="needs scikit-learn (pip install -e '.[mlp]')")
def test_mlp_example_runs(tmp_path, monkeypatch, capsys):
    text = (DOCS / "mlp_example.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    threads = torch.get_num_threads()
    try:
        exec(compile("\n".join(blocks), "mlp_example.md", "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    before, right_after, after, result = scope["before"], scope["right_after"], scope["after"], scope["result"]
    assert before.accuracy > 0.9
    assert result.after.total_params < result.before.total_params
    assert after.accuracy >= right_after.accuracy and after.accuracy >= before.accuracy - 0.02
    assert len(after.per_class) == 10
    assert "per class" in capsys.readouterr().out
