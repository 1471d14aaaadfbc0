"""SeparableInterpolate and the separable_interpolate pass: F.interpolate's results, as products per axis."""

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.kernels.resample import (
    SeparableInterpolate,
    interpolation_matrix,
    is_separable_interpolate,
    separable_interpolate,
)
from tucker_fx.passes.resample import UseSeparableInterpolate, separable_wins
from tucker_fx.passes.runner import run_passes

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
_UPSAMPLES = ("upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d")

# (kwargs of F.interpolate) on inputs of spatial size 7 (or (7, 5, 6) for explicit sizes per axis)
SPECS = [
    pytest.param(dict(scale_factor=2), id="scale2"),
    pytest.param(dict(scale_factor=3), id="scale3"),
    pytest.param(dict(scale_factor=1.5), id="scale1.5"),
    pytest.param(dict(scale_factor=0.5), id="scale0.5"),
    pytest.param(dict(size=10), id="size7to10"),
    pytest.param(dict(size=14), id="size7to14"),
    pytest.param(dict(size=(10, 4, 13)), id="size_per_axis"),
    pytest.param(dict(size=1), id="size1"),
]


def _kwargs(spec: dict, dims: int) -> dict:
    spec = dict(spec)
    if isinstance(spec.get("size"), tuple):
        spec["size"] = spec["size"][:dims]
    return spec


@pytest.fixture
def products(monkeypatch):
    """Counts the products along an axis that the kernel runs (0: it called F.interpolate)."""
    import tucker_fx.kernels.resample as kernel

    calls = []
    along = kernel._along
    monkeypatch.setattr(kernel, "_along", lambda *a: calls.append(a[1]) or along(*a))
    # the product path; the native x2 trilinear kernel that takes float32 scale-2 calls is tested in
    # tests/test_pointwise_chain.py
    monkeypatch.setattr(kernel, "upsample2x_native", lambda *a: False)
    return calls


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_interpolate(dims, spec, align_corners, batch, dtype, products):
    kw = _kwargs(spec, dims)
    x = torch.randn(batch, 3, *(7, 5, 6)[:dims], dtype=dtype)
    ref = F.interpolate(x, mode=MODES[dims], align_corners=align_corners, **kw)
    y = SeparableInterpolate(mode=MODES[dims], align_corners=align_corners, **kw)(x)
    assert sorted(products) == list(range(2, 2 + dims))  # one product per axis, none by F.interpolate
    assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_scale_factor_per_axis_and_identity_axes(dims):
    x = torch.randn(2, 4, *([6] * dims))
    scales = (1.0, 2.0, 3.0)[-dims:]
    ref = F.interpolate(x, scale_factor=scales, mode=MODES[dims])
    torch.testing.assert_close(separable_interpolate(x, None, scales, MODES[dims]), ref, rtol=1e-5, atol=1e-5)
    same = separable_interpolate(x, None, 1.0, MODES[dims])  # every axis the identity: a copy, not x
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


def test_the_matrix_is_the_interpolated_identity():
    m = interpolation_matrix(7, size=10, align_corners=False, dtype=torch.float64)
    assert m.shape == (10, 7)
    torch.testing.assert_close(m.sum(1), torch.ones(10, dtype=torch.float64))  # weights of a row sum to one
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(x @ m.t(), F.interpolate(x[None], size=10, mode="linear")[0], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="exactly one"):
        interpolation_matrix(7)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("align_corners", [False, True])
def test_gradient(dims, align_corners):
    x = torch.randn(2, 2, *(3, 4, 2)[:dims], dtype=torch.float64, requires_grad=True)
    up = SeparableInterpolate(scale_factor=2, mode=MODES[dims], align_corners=align_corners)
    assert torch.autograd.gradcheck(up, (x,))
    (g,) = torch.autograd.grad(up(x).square().sum(), x)
    (ref,) = torch.autograd.grad(F.interpolate(x, scale_factor=2, mode=MODES[dims],
                                               align_corners=align_corners).square().sum(), x)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


def test_matrices_made_in_inference_mode_serve_autograd():
    up = SeparableInterpolate(size=(9, 11, 5), mode="trilinear")  # sizes no other test uses: a fresh cache entry
    x = torch.randn(1, 2, 4, 5, 3)
    with torch.inference_mode():
        up(x)
    xg = x.clone().requires_grad_()
    up(xg).sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


@pytest.mark.parametrize(("x", "kwargs"), [
    (torch.randn(1, 3, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d), dict(scale_factor=2, mode="trilinear")),
    (torch.randn(1, 3, 5, 6, 7).to(torch.bfloat16), dict(scale_factor=2, mode="trilinear")),
    (torch.randn(1, 3, 5, 6), dict(scale_factor=2, mode="nearest")),
    (torch.randn(1, 3, 5, 6), dict(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True)),
    (torch.randn(1, 3, 9, 6), dict(size=(4, 3), mode="bilinear", antialias=True)),
    (torch.randn(1, 3, 5, 6), dict(scale_factor=2, mode="bicubic")),
], ids=["channels_last", "bfloat16", "nearest", "recompute", "antialias", "bicubic"])
def test_everything_else_is_interpolate(x, kwargs, products):
    ref = F.interpolate(x, **kwargs)
    y = SeparableInterpolate(**kwargs)(x)
    assert torch.equal(y, ref) and y.stride() == ref.stride() and not products


def test_predicate_and_bad_arguments():
    assert is_separable_interpolate("trilinear", scale_factor=(1, 2, 2))
    assert is_separable_interpolate("linear", size=10)
    assert not is_separable_interpolate("trilinear", scale_factor=(2, 2))  # one per spatial dim
    assert not is_separable_interpolate("bilinear", size=(4, 4), scale_factor=2)
    assert not is_separable_interpolate("bilinear")
    assert not is_separable_interpolate("bilinear", scale_factor=2, recompute_scale_factor=True)
    assert not is_separable_interpolate("area", scale_factor=2)
    assert SeparableInterpolate(scale_factor=2).separable and not SeparableInterpolate(scale_factor=2,
                                                                                        mode="nearest").separable
    with pytest.raises(ValueError, match="at most one"):
        SeparableInterpolate(size=4, scale_factor=2)
    with pytest.raises(ValueError, match="expected a size at call"):
        SeparableInterpolate(mode="bilinear")(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="needs a module built without"):
        SeparableInterpolate(scale_factor=2, mode="bilinear")(torch.randn(1, 1, 4, 4), size=(8, 8))
    up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(SeparableInterpolate.from_upsample(up)(x), up(x))
    assert SeparableInterpolate.from_upsample(up).state_dict() == {}


def test_size_at_call():
    up = SeparableInterpolate(mode="bilinear", align_corners=True)
    x = torch.randn(1, 2, 5, 7)
    torch.testing.assert_close(up(x, size=torch.Size([9, 8])),
                               F.interpolate(x, size=(9, 8), mode="bilinear", align_corners=True))


def test_traces_compiles_and_exports_as_interpolate(products):
    up = SeparableInterpolate(scale_factor=2, mode="trilinear")
    x = torch.randn(1, 4, 6, 6, 6)
    ref = F.interpolate(x, scale_factor=2, mode="trilinear")
    gm = fx.symbolic_trace(nn.Sequential(up))  # one wrapped call
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)
    assert len(products) == 3
    products.clear()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(up, backend="eager")(x), ref, rtol=1e-5, atol=1e-5)
    assert not products  # under torch.compile: F.interpolate, which inductor lowers itself
    ep = torch.export.export(nn.Sequential(up), (x,))  # fake tensors: the plain upsample op
    assert any("upsample_trilinear3d" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), ref)


# ---- the pass ---------------------------------------------------------------------------------

def _upsample_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    found = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and (n.target in (F.interpolate, F.upsample) or any(
                u in str(n.target) for u in _UPSAMPLES)):
            found.append(n)
        elif n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Upsample):
            found.append(n)
    return found


def _shapes(n: fx.Node) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(n.args[0].meta["tensor_meta"].shape), tuple(n.meta["tensor_meta"].shape)


def _segresnet() -> nn.Module:
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    return nets.SegResNet(3, init_filters=16, in_channels=1, out_channels=2).eval()


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_pass_on_segresnet(capture):
    model = _segresnet()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = model(x)
    if capture == "symbolic_trace":
        gm = fx.symbolic_trace(model)
        propagate_shapes(gm, (x,))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = torch.export.export(model, (x,)).module()
    before = _upsample_nodes(gm)
    assert len(before) == 3
    winners = [n.name for n in before if separable_wins(*_shapes(n))]
    assert len(winners) == 3  # 64 x 4^3, 32 x 8^3 and 16 x 16^3 -> x2: all won when measured
    gm = run_passes(gm, [UseSeparableInterpolate()])
    assert not _upsample_nodes(gm)
    new = [n for n in gm.graph.nodes if n.op == "call_module"
           and isinstance(gm.get_submodule(str(n.target)), SeparableInterpolate)]
    assert len(new) == 3 and all("tensor_meta" in n.meta for n in new)
    assert any("products per axis" in note for note in gm.meta[NOTES_KEY])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(gm, backend="eager")(x), ref, rtol=1e-5, atol=1e-5)


class _Decoder(nn.Module):
    """F.interpolate at a fixed scale and to a skip connection's size, one nn.Upsample called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 16, 1)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        a = F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=True)
        b = F.interpolate(h, size=skip.shape[2:], mode="trilinear")  # a size computed in the graph
        c = self.up(self.up(h))
        return a + b + skip + c[:, :, ::2, ::2, ::2]


def test_pass_on_calls_modules_and_sizes_from_the_graph():
    net = _Decoder().eval()
    x, skip = torch.randn(1, 2, 12, 12, 12), torch.randn(1, 16, 24, 24, 24)
    gm = fx.symbolic_trace(net)
    propagate_shapes(gm, (x, skip))
    assert UseSeparableInterpolate()(gm).modified
    gm.graph.lint()
    gm.recompile()
    assert not _upsample_nodes(gm)
    assert not hasattr(gm, "up")  # both calls of the shared nn.Upsample replaced: the module is gone
    with torch.no_grad():
        torch.testing.assert_close(gm(x, skip), net(x, skip), rtol=1e-5, atol=1e-5)
        x2, skip2 = torch.randn(1, 2, 10, 12, 14), torch.randn(1, 16, 20, 24, 28)  # the size follows the input
        torch.testing.assert_close(gm(x2, skip2), net(x2, skip2), rtol=1e-5, atol=1e-5)


def test_pass_on_the_default_aten_overload():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.upsample_trilinear3d.default, (x, [24, 24, 24], False, 2.0, 2.0, 2.0))
    b = g.call_function(torch.ops.aten.upsample_trilinear3d.default, (x, [20, 30, 24], True))
    c = g.call_function(torch.ops.aten.upsample_trilinear3d.default, (x, [25, 24, 24], False, 2.0, 2.0, 2.0))
    g.output((a, b, c))
    gm = fx.GraphModule(nn.Module(), g)
    inp = torch.randn(1, 16, 12, 12, 12)
    ref = gm(inp)
    propagate_shapes(gm, (inp,))
    assert UseSeparableInterpolate()(gm).modified
    left = _upsample_nodes(gm)
    assert [n.name for n in left] == [c.name]  # a scale that does not give the size: not F.interpolate's
    for y, r in zip(gm(inp), ref):
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-5)


def test_pass_keeps_what_does_not_win():
    net = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Upsample(scale_factor=2, mode="nearest"))
    x = torch.randn(1, 1, 4, 4)  # a 4 x 4 image: ATen's call costs less than the products'
    gm = fx.symbolic_trace(net)
    propagate_shapes(gm, (x,))
    assert not UseSeparableInterpolate()(gm).modified
    assert [type(m).__name__ for m in gm.children()] == ["Upsample", "Upsample"]
    assert any("kept on ATen" in note for note in gm.meta[NOTES_KEY])


def test_rule_follows_the_measured_cases():
    assert separable_wins((1, 16, 32, 32, 32), (1, 16, 64, 64, 64))  # 23 -> 3.3 ms
    assert separable_wins((1, 32, 16, 16, 16), (1, 32, 32, 32, 32))
    assert separable_wins((1, 64, 8, 8, 8), (1, 64, 16, 16, 16))
    assert separable_wins((1, 64, 56, 56), (1, 64, 112, 112))  # 1.3 -> 0.9 ms
    assert not separable_wins((1, 16, 128, 128), (1, 16, 256, 256))  # 1.5 -> 2.3 ms: lost
    assert not separable_wins((1, 16, 128, 128, 128), (1, 16, 64, 64, 64))  # shrinking long axes: lost
    assert not separable_wins((1, 4, 4, 4, 4), (1, 4, 8, 8, 8))  # too small
    assert not separable_wins((1, 16, 32, 32, 32), (1, 16, 64, 64, 64), torch.bfloat16)
    assert not separable_wins((1, 16, 32, 32, 32), (1, 16, 64, 64, 64), device="meta")
