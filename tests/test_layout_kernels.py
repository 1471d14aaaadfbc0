"""Max pools on channels-last data and stride = kernel transposed convs as products: exact, and the
passes put them where the graph has them as modules, functional calls or exported aten calls."""

from __future__ import annotations

import copy as copy_module

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.kernels.conv_transpose import PatchConvTranspose, is_patch_conv_transpose
from tucker_fx.kernels.max_pool import ChannelsLastMaxPool, MaxPoolSpec, SeparableMaxPool, separable_eligible
from tucker_fx.passes.fast_kernels import UseFastKernels
from tucker_fx.passes.lowering import LowerMaxPools


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil", [
    (3, 2, 1, 1, False), (3, 1, 1, 1, False), (2, 2, 0, 1, False), ((1, 3, 3), (1, 2, 2), (0, 1, 1), 1, False),
    (3, 2, 0, 2, False), (3, 2, 1, 1, True),
])
def test_channels_last_max_pool_is_exact(kernel, stride, padding, dilation, ceil):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 10, 11)
    ref = F.max_pool3d(x, kernel, stride, padding, dilation, ceil)
    out = ChannelsLastMaxPool(kernel, stride, padding, dilation, ceil)(x)
    assert torch.equal(out, ref) and out.is_contiguous()


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, 2, 1), (3, 1, 1), (2, 1, 1), (3, 2, 0), (2, 2, 0), (4, 3, 2), (5, 1, 2), (1, 1, 0), (1, 2, 0),
    ((1, 3, 3), (1, 2, 2), (0, 1, 1)), ((2, 3, 4), (1, 2, 3), (1, 1, 2)), ((3, 1, 2), (2, 1, 2), (1, 0, 1)),
])
@pytest.mark.parametrize("shape", [(2, 5, 9, 10, 11), (5, 7, 8, 9), (1, 3, 4, 4, 5)])
def test_separable_max_pool_is_exact(kernel, stride, padding, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x.view(-1)[37] = float("nan")  # propagated like max_pool3d
    x[..., 0, 0, 0] = float("-inf")
    ref = F.max_pool3d(x, kernel, stride, padding)
    out = SeparableMaxPool(kernel, stride, padding)(x)
    assert out.shape == ref.shape and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(0.0), ref.nan_to_num(0.0)) and out.is_contiguous()


def test_separable_max_pool_never_writes_its_input_and_refuses_bad_geometry():
    x = torch.randn(1, 2, 6, 6, 6)
    kept = x.clone()
    SeparableMaxPool(3, 1, 1)(x)  # stride 1: one offset covers the whole axis, the others only parts
    assert torch.equal(x, kept)
    with pytest.raises(ValueError, match="at most half"):
        SeparableMaxPool(3, 1, 2)
    with pytest.raises(ValueError, match="dilation 1"):
        SeparableMaxPool.from_spec(MaxPoolSpec((3, 3, 3), (2, 2, 2), (1, 1, 1), (2, 2, 2)))
    assert not separable_eligible(MaxPoolSpec((3, 3, 3), (2, 2, 2), ceil_mode=True))
    with pytest.raises(ValueError, match="expected a"):
        SeparableMaxPool(3)(torch.randn(4, 5, 6))


def test_separable_max_pool_gradient_reaches_the_maxima():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 7, 7, 7, requires_grad=True)
    SeparableMaxPool(3, 2, 1)(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    F.max_pool3d(x, 3, 2, 1).sum().backward()
    torch.testing.assert_close(g, x.grad)  # no ties in random data: the same routing


def test_small_pools_keep_the_channels_last_kernel():
    net = nn.Sequential(nn.MaxPool3d(3, 2, 1)).eval()
    x = torch.randn(1, 4, 8, 8, 8)  # 2^11 values: three passes' overhead would lose
    gm = torch.fx.symbolic_trace(net)
    propagate_shapes(gm, (x,))
    LowerMaxPools(tune=False)(gm)
    assert isinstance(gm.get_submodule("0"), ChannelsLastMaxPool)
    assert torch.equal(gm(x), net(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_patch_conv_transpose_matches(dims, batch, bias):
    torch.manual_seed(0)
    k = (2, 3, 2)[:dims]
    up = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1](6, 4, k, stride=k, bias=bias).double()
    x = torch.randn(batch, 6, *(3, 4, 5)[:dims], dtype=torch.float64)
    out = PatchConvTranspose.from_module(up)(x)
    torch.testing.assert_close(out, up(x), rtol=1e-12, atol=1e-12)


def test_patch_conv_transpose_is_differentiable():
    torch.manual_seed(0)
    up = nn.ConvTranspose3d(3, 2, 2, stride=2).double()
    patch = PatchConvTranspose.from_module(up)
    x = torch.randn(1, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(patch, (x,))


@pytest.mark.parametrize("conf", [dict(stride=1), dict(stride=2, padding=1), dict(stride=2, output_padding=1)])
def test_patch_conv_transpose_refuses_overlap(conf):
    up = nn.ConvTranspose3d(3, 2, 2, **conf)
    assert not is_patch_conv_transpose(tuple(up.weight.shape), up.stride, up.padding, up.output_padding)
    with pytest.raises(ValueError, match="stride == kernel_size"):
        PatchConvTranspose.from_module(up)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool3d(3, 2, 1)
        self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)

    def forward(self, x):
        y = self.pool(x) + F.max_pool3d(x, 3, 2, 1) + F.max_pool3d(x, 2, 2)
        return self.up(y)


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_passes_replace_modules_calls_and_aten(capture):
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(1, 8, 64, 64, 64)  # an up-conv output of 2^20 values: large enough to lower
    gm = (torch.fx.symbolic_trace(net) if capture == "symbolic_trace"
          else torch.export.export(net, (x,)).module())
    gm = gm if isinstance(gm, torch.fx.GraphModule) else torch.fx.symbolic_trace(gm)
    propagate_shapes(gm, (x,))
    ref = net(x)
    LowerMaxPools(tune=False)(gm)
    UseFastKernels()(gm)
    kinds = {type(m).__name__ for m in gm.modules()}
    # 8 x 64^3 inputs: the overlapping pools run as separable maxima, the tiling one as WindowMax
    assert {"SeparableMaxPool", "WindowMax", "PatchConvTranspose"} <= kinds, kinds
    assert not any(n.op == "call_function" and "max_pool" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


def test_tuned_pool_lowering_times_the_call_itself():
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(1, 8, 16, 16, 16)
    gm = torch.fx.symbolic_trace(net)
    propagate_shapes(gm, (x,))
    ref = net(x)
    LowerMaxPools(tune=True, cache=None, repeats=1)(gm)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)  # whichever candidate won the timing, bit for bit


def test_zero_width_pads_are_dropped_only_where_nothing_else_sees_the_tensor():
    from tucker_fx.passes.noop_pads import DropNoOpPads

    class Net(nn.Module):
        def forward(self, x):
            a = F.pad(x, [0, 0, 0, 0], mode="replicate")  # of an input: kept (an in-place op after would reach it)
            y = x * 2
            b = F.pad(y, [0, 0, 0, 0], mode="replicate").relu_()  # y used once: dropped
            z = x + 1
            c = F.pad(z, [0, 0, 0, 0], mode="replicate").relu_()  # z used twice: kept
            return a + b + c + z

    x = torch.randn(1, 2, 4, 4)
    gm = torch.fx.symbolic_trace(Net())
    ref = Net()(x)
    assert DropNoOpPads()(gm).modified
    assert sum("pad" in str(n.target) for n in gm.graph.nodes) == 2
    torch.testing.assert_close(gm(x), ref)


def test_tuner_never_reverts_a_layer_on_unsteady_timings(monkeypatch):
    """A busy machine (wild spread, twice) must not put the original layer back."""
    import tucker_fx
    import tucker_fx.passes.lowering as lowering

    calls = {"n": 0}

    def fake_samples(fns, repeats=7, **kw):
        calls["n"] += 1
        # 'original' looks fastest, but every candidate's runs spread by x3: noise
        return {k: ([1.0, 3.0, 1.0, 3.0, 1.0] if k == "original" else [2.0, 6.0, 2.0, 6.0, 2.0]) for k in fns}

    monkeypatch.setattr(lowering, "compare_samples", fake_samples)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 16, 8, 8)
    r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.5, tune=True, tuning_cache=False,
                                                                 speed_check=False, progress=False))
    entry = r.plan["0"]
    assert entry.applied and entry.lowering != "original"
    assert entry.lowering_source == lowering.BUSY_SOURCE
    assert calls["n"] >= 2  # measured again before deciding


def test_separable_max_pool_keeps_its_large_intermediate_maps_and_returns_fresh_ones() -> None:
    torch.manual_seed(0)
    pool = SeparableMaxPool(3, 2, 1)
    x = torch.randn(1, 64, 64, 64, 64)  # the first pass's map: 64 x 32 x 64 x 64 floats, 32 MiB
    with torch.no_grad():
        first = pool(x)
        kept = pool._scratch.nbytes()
        second = pool(x + 1)
    assert kept == 32 << 20 and pool._scratch.nbytes() == kept  # only the first pass's map, reused
    assert torch.equal(first, F.max_pool3d(x, 3, 2, 1))  # not overwritten by the second call
    assert torch.equal(second, F.max_pool3d(x + 1, 3, 2, 1))
    copy = copy_module.deepcopy(pool)
    assert copy._scratch.nbytes() == 0 and torch.equal(copy(x), first)


def test_separable_max_pool_keeps_nothing_where_autograd_records() -> None:
    pool = SeparableMaxPool(3, 2, 1)
    x = torch.randn(1, 64, 64, 64, 64, requires_grad=True)
    pool(x).sum().backward()
    assert pool._scratch.nbytes() == 0 and x.grad is not None
