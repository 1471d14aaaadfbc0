"""The passes that avoid full-width buffers: a channel cat fed part by part to its 1x1 convs
(``passes.cat_pointwise``) and norms/adds written in place (``passes.inplace``). Both must be exact,
fire where the buffer is the graph's own, and leave alone anything another reader could see."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import tucker_fx
from tucker_fx import TuckerConfig
from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.kernels.inplace import InplaceInstanceNorm, add_into
from tucker_fx.kernels.pointwise import PointwiseConv
from tucker_fx.passes.cat_pointwise import CatIntoPointwise
from tucker_fx.passes.inplace import WriteInPlace
from tucker_fx.testing import zoo

QUIET = dict(progress=False, speed_check=False)


class _Leaf(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, PointwiseConv) or super().is_leaf_module(m, name)


def _trace(net: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(net, _Leaf().trace(net))


class CatMix(nn.Module):
    def __init__(self, channels: tuple[int, ...], out: int, stride: tuple[int, ...], bias: bool, also: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out, sum(channels), *[1] * len(stride), generator=g)
        self.mix = PointwiseConv(w, torch.randn(out, generator=g) if bias else None, stride)
        self.also = also
        self.channels = list(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.channels, dim=1)
        cat = torch.cat([parts[i] for i in range(len(self.channels))], dim=1)
        out = self.mix(cat)
        return out + cat.mean() if self.also else out


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("channels, bias", [((3, 5), True), ((4, 2, 6), False)])
def test_cat_into_pointwise_is_exact(dims, stride, batch, channels, bias) -> None:
    net = CatMix(channels, 7, (stride,) * dims, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sum(channels), *[6] * dims, generator=g)
    ref = net(x)
    gm = _trace(net)
    assert CatIntoPointwise()(gm).modified
    assert not any(n.target is torch.cat for n in gm.graph.nodes)
    assert any("concatenations fed part by part" in n for n in gm.meta[NOTES_KEY])
    out = gm(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    cl = x.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    assert torch.allclose(gm(cl), ref, atol=1e-5, rtol=1e-5)  # another layout: the cat, as before


def test_cat_into_pointwise_keeps_a_cat_that_others_read() -> None:
    net = CatMix((3, 5), 4, (1, 1), True, also=True)
    gm = _trace(net)
    assert not CatIntoPointwise()(gm).modified
    assert any(n.target is torch.cat for n in gm.graph.nodes)


def test_pointwise_parts_reject_a_channel_mismatch() -> None:
    mix = PointwiseConv(torch.randn(4, 6, 1, 1), None, (1, 1))
    with pytest.raises(ValueError, match="7 channels together, the weight expects 6"):
        mix(torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4))


def test_pointwise_parts_differentiable() -> None:
    mix = PointwiseConv(torch.randn(4, 6, 1, 1, 1), torch.randn(4), (1, 1, 1))
    a = torch.randn(1, 2, 3, 3, 3, requires_grad=True)
    b = torch.randn(1, 4, 3, 3, 3, requires_grad=True)
    mix(a, b).square().sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    mix(torch.cat([a2, b2], 1)).square().sum().backward()
    assert torch.allclose(a.grad, a2.grad, atol=1e-5) and torch.allclose(b.grad, b2.grad, atol=1e-5)


class Decoder(nn.Module):
    """A U-Net decoder step: up-sample, cat with the skip, 3x3x3 conv, InstanceNorm, residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv3d(16, 32, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(32, 16, 2, stride=2)
        self.conv = nn.Conv3d(32, 32, 3, padding=1)
        self.norm = nn.InstanceNorm3d(32, affine=True)
        self.conv2 = nn.Conv3d(32, 32, 3, padding=1)
        self.gn = nn.GroupNorm(4, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        y = self.conv(torch.cat([self.up(F.relu(self.down(x))), skip], dim=1))
        y = F.leaky_relu(self.norm(y), 0.01, inplace=True)
        return self.gn(self.conv2(y)) + y


@pytest.mark.filterwarnings("ignore::tucker_fx.errors.PoorCompressionWarning")
def test_compress_feeds_the_decoders_cat_to_its_first_factor_and_writes_in_place() -> None:
    torch.manual_seed(0)
    net = zoo.randomize_norms(Decoder()).eval()
    x = torch.randn(1, 16, 8, 8, 8)
    kept = x.clone()
    config = TuckerConfig(rank=0.25, **QUIET)
    low = tucker_fx.compress(net, x, config=config)
    notes = " ".join(low.module.meta.get(NOTES_KEY, []))
    assert "concatenations fed part by part" in notes and "written in place" in notes
    kinds = {type(m).__name__ for m in low.module.modules()}
    # both norms follow a widening last factor: computed from its input (passes.norm_fold); the add in place
    assert "NormedPointwise" in kinds and "norms computed from their 1x1 conv's input" in notes
    plain = tucker_fx.compress(net, x, config=config.replace(lowering="none"))
    full = tucker_fx.compress(net, x, config=TuckerConfig(rank=1.0, only_if_cheaper=False, **QUIET))
    with torch.no_grad():
        assert zoo.rel_error(plain.module(x), low.module(x)) < 1e-5  # the same model, with and without the passes
        assert zoo.rel_error(net(x), full.module(x)) < 1e-5  # exact at full rank
    assert torch.equal(x, kept)  # the model's input is never written


def _norm_net(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), norm, nn.ReLU()).eval()


@pytest.mark.parametrize("norm, kind", [(lambda: nn.InstanceNorm3d(8, affine=True), InplaceInstanceNorm),
                                         (lambda: nn.InstanceNorm3d(8), InplaceInstanceNorm)],
                         ids=["instance_affine", "instance"])
@pytest.mark.parametrize("batch", [1, 3])
def test_norms_in_place_are_exact(norm, kind, batch) -> None:
    torch.manual_seed(0)
    net = zoo.randomize_norms(_norm_net(norm()))
    x = torch.randn(batch, 2, 4, 5, 6)
    gm = fx.symbolic_trace(net)
    ref = net(x)
    assert WriteInPlace()(gm).modified
    assert isinstance(gm.get_submodule("1"), kind)
    with torch.no_grad():
        out = gm(x)
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
    # with autograd recording: the out-of-place op, and gradients flow
    out = gm(x)
    out.sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert net[0].weight.grad is not None
    # through torch.compile: the functional op
    compiled = torch.compile(gm, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), ref, atol=1e-5)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 1)
        self.norm = nn.InstanceNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.norm(self.conv(x))  # a buffer only the norm reads
        b = self.norm(x)  # the model's input: must not be written
        return a + b


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 1)
        self.norm = nn.InstanceNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y  # y is read twice: neither the norm nor the add may write into it


@pytest.mark.parametrize("net", [Shared, Residual])
def test_buffers_that_others_read_are_not_written(net) -> None:
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(1, 4, 3, 3, 3)
    kept = x.clone()
    with torch.no_grad():
        ref = model(x)
        gm = fx.symbolic_trace(model)
        WriteInPlace()(gm)
        assert isinstance(gm.get_submodule("norm"), nn.InstanceNorm3d)
        assert torch.equal(gm(x), ref)
    assert torch.equal(x, kept)


def test_add_into_writes_only_a_buffer_it_owns() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            u = self.a(x)
            return x + self.b(x), u + x.mean()  # the second add: its tensor operand u is owned, x.mean() a new scalar

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        ref = net(x)
        gm = fx.symbolic_trace(net)
        assert WriteInPlace()(gm).modified
        adds = [n for n in gm.graph.nodes if n.target is add_into]
        assert [a.args[0].target for a in adds] == ["b", "a"]  # the conv outputs, never x
        out = gm(x)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))
    # a broadcasting add falls back to the ordinary op
    assert torch.equal(add_into(torch.ones(2, 1), torch.ones(1, 3)), torch.full((2, 3), 2.0))


@pytest.mark.parametrize("norm", [lambda: nn.InstanceNorm3d(8, affine=True), lambda: nn.GroupNorm(2, 8),
                                  lambda: nn.InstanceNorm3d(8, track_running_stats=True)],
                         ids=["training_mode", "group_norm", "running_stats"])
def test_other_norms_are_left_alone(norm) -> None:
    net = _norm_net(norm())
    if isinstance(net[1], nn.InstanceNorm3d) and not net[1].track_running_stats:
        net.train()
    gm = fx.symbolic_trace(net)
    WriteInPlace()(gm)
    assert type(gm.get_submodule("1")) is type(net[1])


def test_inplace_modules_reject_other_norms() -> None:
    with pytest.raises(ValueError, match="without running statistics"):
        InplaceInstanceNorm(nn.InstanceNorm3d(4, track_running_stats=True))


class UpCat(nn.Module):
    """A U-Net up step: stride = kernel up-conv, cat with the skip, a decomposable 3x3x3 conv."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(32, 32, 2, stride=2, bias=bias)
        self.conv = nn.Conv3d(64, 32, 3, padding=1, bias=bias)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([self.up(low), skip], dim=1)))


@pytest.mark.filterwarnings("ignore::tucker_fx.errors.PoorCompressionWarning")
@pytest.mark.parametrize("bias", [True, False])
def test_the_up_conv_takes_in_its_share_of_the_first_factor(bias) -> None:
    from tucker_fx.kernels.pointwise import MixParts

    torch.manual_seed(0)
    net = UpCat(bias).eval()
    # an up-conv output of 2^20 values: large enough for its patch kernel (fast_kernels' rule)
    low, skip = torch.randn(1, 32, 16, 16, 16), torch.randn(1, 32, 32, 32, 32)
    config = TuckerConfig(rank=0.25, merge=False, **QUIET)
    r = tucker_fx.compress(net, low, skip, config=config)
    plain = tucker_fx.compress(net, low, skip, config=config.replace(lowering="none"))
    notes = " ".join(r.module.meta.get(NOTES_KEY, []))
    assert "output channels mixed to" in notes, notes
    mixes = [m for m in r.module.modules() if isinstance(m, MixParts)]
    assert len(mixes) == 1 and mixes[0].keep == 0
    # MACs by hand: the up-conv now makes R_s channels (R_s = the first factor's rows), and the first
    # factor reads only the skip's 32 channels
    r_s = mixes[0].weight.shape[0]
    rows = {row.name: row for row in r.after.rows}
    up = next(row for row in r.after.rows if row.target == "PatchConvTranspose" or "up" == row.name)
    assert up.macs == 16 ** 3 * 32 * r_s * 8
    # the skip's block of the first factor: 32 -> r_s channels at 32^3 (next() raises when there is none)
    next(row for row in r.after.rows if row.kind == "conv" and row.macs == 32 ** 3 * 32 * r_s)
    assert "unsupported" not in {row.kind for row in rows.values()}, [n for n, row in rows.items() if row.kind == "unsupported"]
    with torch.no_grad():
        assert zoo.rel_error(plain.module(low, skip), r.module(low, skip)) < 1e-5
        compiled = torch.compile(r.module, backend="eager")  # dynamo traces the parts and MixParts
        assert zoo.rel_error(plain.module(low, skip), compiled(low, skip)) < 1e-5
    # differentiable through the merged up-conv and MixParts
    r.module(low, skip).square().sum().backward()
    g_r = r.module.get_submodule("up").weight.grad
    assert g_r is not None and torch.isfinite(g_r).all()
