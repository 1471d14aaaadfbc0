"""passes.channels_last_cores: a block's core on channels-last data, its factors converting for free."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import tucker_fx
from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.kernels.norm_fold import NormedPointwise
from tucker_fx.kernels.pointwise import MkldnnConv, PointwiseConv
from tucker_fx.passes.channels_last_cores import ChannelsLastCores

CL = torch.channels_last_3d


class _Block(nn.Module):
    def __init__(self, c: int, r: int, norm: bool, tap: bool = False) -> None:
        super().__init__()
        self.first, self.core, self.last = nn.Conv3d(c, r, 1, bias=False), nn.Conv3d(r, r, 3, padding=1), nn.Conv3d(r, c, 1)
        self.norm = nn.InstanceNorm3d(c, affine=True) if norm else nn.Identity()
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.first(x)
        y = self.norm(self.last(self.core(z)))
        return y + z.sum() if self.tap else y


def _prepared(net: _Block, x: torch.Tensor, mkldnn_core: bool = False) -> fx.GraphModule:
    gm = fx.symbolic_trace(net)
    gm.first = PointwiseConv.from_conv(net.first)
    if mkldnn_core:
        gm.core = MkldnnConv(net.core)
    if isinstance(net.norm, nn.InstanceNorm3d):
        gm.last = NormedPointwise(PointwiseConv.from_conv(net.last), net.norm)
    else:
        gm.last = PointwiseConv.from_conv(net.last)
    gm.recompile()
    if isinstance(net.norm, nn.InstanceNorm3d):  # the norm is inside NormedPointwise now: drop its node
        node = next(n for n in gm.graph.nodes if n.target == "norm")
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.recompile()
    propagate_shapes(gm, (x,))
    return gm


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("mkldnn_core", [False, True])
def test_channels_last_core_is_exact_and_returns_the_usual_layout(norm: bool, mkldnn_core: bool) -> None:
    torch.manual_seed(0)
    net = _Block(16, 8, norm).eval()
    x = torch.randn(1, 16, 32, 32, 32)
    gm = _prepared(net, x, mkldnn_core)
    assert ChannelsLastCores()(gm).modified
    assert gm.first.layout == "to_channels_last" and isinstance(gm.core, MkldnnConv)
    if not norm:
        assert gm.last.layout == "to_contiguous"
    seen = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["cl"] = inputs[0].is_contiguous(memory_format=CL)

    gm.core.register_forward_hook(hook)
    with torch.no_grad():
        out = gm(x)
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-4)
    assert seen["cl"] and out.is_contiguous()
    assert "channels-last" in " ".join(gm.meta[NOTES_KEY])


def test_channels_last_core_trains_and_compiles_the_same() -> None:
    torch.manual_seed(1)
    net = _Block(16, 8, norm=True)
    x = torch.randn(1, 16, 32, 32, 32)
    gm = _prepared(net, x)
    assert ChannelsLastCores()(gm).modified
    target = torch.randn(1, 16, 32, 32, 32)  # (a normalised map's sum of squares is constant: no gradient to compare)
    (gm(x) * target).sum().backward()
    got = gm.first.weight.grad.clone().reshape(net.first.weight.shape)
    (net(x) * target).sum().backward()
    want = net.first.weight.grad
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    with torch.no_grad():
        compiled = torch.compile(gm, backend="eager")
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c, r, shape, tap, why", [
    (16, 8, (1, 16, 16, 16, 16), False, "fewer than 32^3 positions"),
    (16, 4, (1, 16, 32, 32, 32), False, "a 4-channel core"),
    (16, 8, (2, 16, 32, 32, 32), False, "batch 2"),
    (16, 8, (1, 16, 32, 32, 32), True, "the first factor's map is read elsewhere"),
])
def test_channels_last_cores_refuses(c: int, r: int, shape: tuple, tap: bool, why: str) -> None:
    torch.manual_seed(2)
    net = _Block(c, r, norm=False, tap=tap).eval()
    x = torch.randn(shape)
    gm = _prepared(net, x)
    assert not ChannelsLastCores()(gm).modified, why
    assert gm.first.layout == "keep"
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x), rtol=1e-4, atol=1e-4)


def test_compress_runs_wide_enough_cores_channels_last() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv3d(32, 32, 3, padding=1), nn.InstanceNorm3d(32, affine=True), nn.ReLU(),
                        nn.Conv3d(32, 32, 3, padding=1)).eval()
    x = torch.randn(1, 32, 32, 32, 32)
    r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, tuning_cache=False,
                                                                 validate=False))
    assert "core convs on channels-last data" in " ".join(r.module.meta.get(NOTES_KEY, []))
    plain = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, lowering="none",
                                                                     validate=False))
    with torch.no_grad():
        torch.testing.assert_close(r.module(x), plain.module(x), rtol=1e-4, atol=1e-4)
