"""ONNX export of compressed models (``pip install tucker_fx[export]``).

``torch.onnx.export`` (the torch.export-based exporter, the default of torch 2.13) takes the
compressed GraphModule as it is; the ONNX checker accepts the result, and onnxruntime's output
is checked against PyTorch's. onnx, onnxscript and onnxruntime are in the test extra: without
them this module fails to import (it does not skip), so CI cannot pass with the check left out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tucker_fx
from tucker_fx import TuckerConfig
from tucker_fx.models import TEST_MODELS

try:
    import onnx
    import onnxruntime as ort
    import onnxscript  # noqa: F401  (the exporter of torch >= 2.9 translates through it)
except ImportError as exc:  # pragma: no cover - a broken test environment, reported as an error
    raise ImportError(f"{exc}: the ONNX tests need the test extra (pip install -c constraints.txt -e '.[test]')") from exc

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")


def _export(module: nn.Module, x: torch.Tensor, path) -> "onnx.ModelProto":
    program = torch.onnx.export(module, (x,), dynamo=True, optimize=True, verbose=False)
    program.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return model


def _check_runs(path, x: torch.Tensor, expected: torch.Tensor) -> None:
    """onnxruntime's output equals PyTorch's."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel(expected, torch.from_numpy(out)) < 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in ("conv1d", "conv2d", "residual3d")]
                         + ["functional"])  # each export takes ~5 s: one runs in the fast loop
def test_plain_chain_exports_and_runs(tmp_path, name):
    factory, shape = TEST_MODELS[name]
    x = torch.randn(shape)
    result = tucker_fx.compress(factory(), x, config=TuckerConfig(rank=0.5, lowering="none", progress=False))
    path = tmp_path / f"{name}.onnx"
    model = _export(result.module, x, path)
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" in ops or "Gemm" in ops or "MatMul" in ops
    with torch.no_grad():
        expected = result.module(x)
    _check_runs(path, x, expected)


@pytest.mark.slow  # ONNX export, over 5 s
def test_default_lowering_exports_and_runs(tmp_path):
    """Merged and lowered graphs (here: BatchNorm folded, merges, cost-model lowering) export too."""
    factory, shape = TEST_MODELS["residual3d"]
    x = torch.randn(shape)
    result = tucker_fx.compress(factory(), x, config=TuckerConfig(rank=0.5, progress=False, tuning_cache=False))
    path = tmp_path / "lowered.onnx"
    _export(result.module, x, path)
    with torch.no_grad():
        expected = result.module(x)
    _check_runs(path, x, expected)


@pytest.mark.slow  # an ONNX export attempt, ~5 s
@pytest.mark.xfail(strict=True, raises=torch.onnx.OnnxExporterError,
                   reason="torch 2.13's ONNX exporter has no translation for the complex tensors of FFT-lowered "
                          "layers; export with lowering='none' (docs/backend.md)")
def test_fft_lowered_layer_does_not_export_yet(tmp_path):
    conv = nn.Sequential(nn.Conv2d(4, 8, 9, padding=4)).eval()
    x = torch.randn(1, 4, 32, 32)
    cfg = TuckerConfig(rank=1.0, only_if_cheaper=False, progress=False, tuning_cache=False, validate=False)
    plan = tucker_fx.compress(conv, x, config=cfg).plan
    plan["0"].lowering = "fft"
    result = tucker_fx.apply_plan(conv, plan, x, config=cfg)
    assert result.plan["0"].lowering == "fft" and result.plan["0"].lowering_source == "plan"
    _export(result.module, x, tmp_path / "fft.onnx")
