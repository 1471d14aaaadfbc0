"""The native narrow-conv kernel (kernels/native) and its module: exact against F.conv3d, and the
fallbacks where it cannot run."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tucker_fx
from tucker_fx.kernels import native
from tucker_fx.kernels.narrow_conv import NarrowConv3d, narrow_eligible
from tucker_fx.kernels.pointwise import MkldnnConv
from tucker_fx.passes.fast_kernels import narrow_wins

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.status()}")

CPU = torch.device("cpu")


@needs_native
@pytest.mark.parametrize("c,o", [(1, 4), (4, 4), (3, 5), (8, 4), (4, 9), (16, 4), (8, 8)])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 17), (7, 6, 16), (5, 9, 33), (3, 4, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_is_the_conv(c: int, o: int, shape: tuple[int, int, int], bias: bool) -> None:
    torch.manual_seed(c * 100 + o)
    x, w = torch.randn(2, c, *shape), torch.randn(o, c, 3, 3, 3)
    b = torch.randn(o) if bias else None
    # rounding only: 27 * c products (outputs of size ~sqrt(27 c)) summed in another order; a wrong
    # or missing tap would be off by ~1
    atol = 4e-6 * (27 * c) ** 0.5
    torch.testing.assert_close(native.narrow_conv3d(x, w, b), F.conv3d(x, w, b, padding=1), rtol=1e-5, atol=atol)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2])
def test_threads_split_the_planes_and_give_the_same_result(threads: int, n: int) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(n, 4, 13, 6, 20), torch.randn(4, 4, 3, 3, 3), torch.randn(4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = native.narrow_conv3d(x, w, b)
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1)
    try:
        one = native.narrow_conv3d(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, one)  # each plane is computed by the same code whichever thread runs it


@needs_native
def test_kernel_reads_non_contiguous_input_and_checks_its_arguments() -> None:
    x = torch.randn(1, 4, 8, 5, 6).transpose(2, 4)  # a strided view: copied to contiguous first
    w = torch.randn(4, 4, 3, 3, 3)
    torch.testing.assert_close(native.narrow_conv3d(x, w, None), F.conv3d(x, w, padding=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected x \(N, C, D, H, W\) and weight \(O, C, 3, 3, 3\), got"):
        native.narrow_conv3d(x, torch.randn(4, 4, 3, 3, 1), None)
    with pytest.raises(ValueError, match="expected float32 CPU tensors, got x torch.float64"):
        native.narrow_conv3d(x.double(), w, None)


def test_eligibility_follows_the_geometry_and_the_channels() -> None:
    assert narrow_eligible(nn.Conv3d(4, 4, 3, padding=1))
    assert narrow_eligible(nn.Conv3d(64, 4, 3, padding=1))   # one narrow side
    assert narrow_eligible(nn.Conv3d(8, 8, 3, padding=1))    # both at most 8
    assert not narrow_eligible(nn.Conv3d(16, 16, 3, padding=1))
    assert not narrow_eligible(nn.Conv3d(4, 4, 3, padding=1, stride=2))
    assert not narrow_eligible(nn.Conv3d(4, 4, 3, padding=2, dilation=2))
    assert not narrow_eligible(nn.Conv3d(4, 4, 3, padding=0))
    assert not narrow_eligible(nn.Conv3d(4, 4, 3, padding=1, groups=2))
    assert not narrow_eligible(nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not narrow_eligible(nn.Conv2d(4, 4, 3, padding=1))
    assert not narrow_eligible(nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1)))
    with pytest.raises(ValueError, match="NarrowConv3d: expected a 3x3x3 Conv3d .* got Conv3d"):
        NarrowConv3d(nn.Conv3d(16, 16, 3, padding=1))
    conv, shape = nn.Conv3d(4, 4, 3, padding=1), (1, 4, 8, 8, 8)
    assert narrow_wins(conv, shape, CPU, torch.float32) == native.available()
    assert not narrow_wins(conv, shape, CPU, torch.float64)
    assert not narrow_wins(conv, shape, torch.device("meta"), torch.float32)


def _conv() -> nn.Conv3d:
    torch.manual_seed(0)
    return nn.Conv3d(4, 4, 3, padding=1)


@pytest.mark.parametrize("how", ["native", "disabled", "channels_last", "float64"])
def test_module_is_the_conv_on_every_path(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conv = _conv()
    m = NarrowConv3d(conv)
    x = torch.randn(1, 4, 6, 7, 20)
    calls: list[str] = []
    real = native.narrow_conv3d
    monkeypatch.setattr(native, "narrow_conv3d", lambda *a: calls.append("native") or real(*a))
    if how == "disabled":
        monkeypatch.setitem(native._state, "lib", None)
    elif how == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif how == "float64":
        conv, m, x = conv.double(), NarrowConv3d(conv.double()), x.double()
    with torch.no_grad():
        torch.testing.assert_close(m(x), conv(x), rtol=1e-5, atol=1e-5)
    assert calls == (["native"] if how == "native" and native.available() else [])


def test_module_trains_exportable_and_compiles() -> None:
    conv = _conv()
    m = NarrowConv3d(conv)
    x = torch.randn(1, 4, 5, 6, 9, requires_grad=True)
    m(x).square().sum().backward()
    gx, gw = x.grad.clone(), m.weight.grad.clone()
    x.grad = None
    conv(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, conv.weight.grad, rtol=1e-4, atol=1e-4)
    ep = torch.export.export(m, (x.detach(),))  # a plain conv: the program loads without tucker_fx
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("tucker_fx" in t or "mkldnn" in t for t in targets), targets
    torch.testing.assert_close(ep.module()(x.detach()), conv(x).detach(), rtol=1e-5, atol=1e-5)
    gm = torch.fx.symbolic_trace(m)  # a leaf call in a traced graph
    assert any(n.op == "call_function" and "narrow_conv" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.slow
def test_module_compiles_with_inductor_as_an_opaque_op() -> None:
    conv = _conv()
    m = NarrowConv3d(conv)
    x = torch.randn(1, 4, 6, 6, 18)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_compress_runs_narrow_cores_on_the_kernel_and_computes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 16, 8, 8, 16)
    config = tucker_fx.TuckerConfig(rank=0.25, only_if_cheaper=False, keep_original_if_faster=False, progress=False)
    r = tucker_fx.compress(net, x, config=config)
    cores = [type(m).__name__ for m in r.module.modules() if isinstance(m, MkldnnConv)]
    assert cores == ["NarrowConv3d" if native.available() else "MkldnnConv"] * 2  # 4 -> 4 cores
    notes = " ".join(r.module.meta.get("tucker_fx.notes", []))
    assert ("narrow 3x3x3 convs on the native kernel" in notes) == native.available()
    monkeypatch.setitem(native._state, "lib", None)  # as on a machine where it does not build
    plain = tucker_fx.compress(net, x, config=config)
    assert not any(type(m) is NarrowConv3d for m in plain.module.modules())
    with torch.no_grad():
        torch.testing.assert_close(r.module(x), plain.module(x), rtol=1e-5, atol=1e-5)


def test_status_says_why_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("TUCKER_FX_NATIVE", "0")
    assert not native.available()
    assert native.status() == "disabled by TUCKER_FX_NATIVE=0"
    with pytest.raises(RuntimeError, match="not available"):
        native.narrow_conv3d(torch.randn(1, 4, 3, 3, 3), torch.randn(4, 4, 3, 3, 3), None)
