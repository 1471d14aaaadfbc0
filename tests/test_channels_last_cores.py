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
from tucker_fx.kernels.pointwise import MixParts, MkldnnConv, PointwiseConv, channels_last_copy
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
    assert ChannelsLastCores(measure=False)(gm).modified
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
    assert ChannelsLastCores(measure=False)(gm).modified
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
    assert not ChannelsLastCores(measure=False)(gm).modified, why
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
    notes = " ".join(r.module.meta.get(NOTES_KEY, []))  # measured: which way it goes is the machine's business
    assert "core convs on channels-last data" in notes or "channels-last measured no faster" in notes
    plain = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, lowering="none",
                                                                     validate=False))
    with torch.no_grad():
        torch.testing.assert_close(r.module(x), plain.module(x), rtol=1e-4, atol=1e-4)


def _timer(ms: dict[str, float], calls: list[str]):
    def timer(fns):
        with torch.no_grad():
            for name, fn in fns.items():  # every variant runs, and computes the block
                calls.append(name)
                assert fn().shape[1] == 16
        return dict(ms)
    return timer


@pytest.mark.parametrize("ms, want", [
    ({"keep": 10.0, "to_channels_last": 5.0, "copy": 7.0}, "to_channels_last"),
    ({"keep": 10.0, "to_channels_last": 30.0, "copy": 6.0}, "copy"),
    ({"keep": 10.0, "to_channels_last": 9.5, "copy": 9.2}, "keep"),  # < MIN_GAIN: noise
])
@pytest.mark.parametrize("norm", [False, True])
def test_measured_choice_keeps_the_fastest_variant_and_is_exact(ms: dict, want: str, norm: bool) -> None:
    torch.manual_seed(4)
    net = _Block(16, 4, norm).eval()  # a 4-channel core: tried only when measured
    x = torch.randn(1, 16, 32, 32, 32)
    gm = _prepared(net, x)
    calls: list[str] = []
    result = ChannelsLastCores(timer=_timer(ms, calls))(gm)
    assert sorted(calls) == sorted(["keep", "to_channels_last", "copy"])
    assert result.modified == (want != "keep")
    assert gm.first.layout == (want if want == "to_channels_last" else "keep")
    copies = [n for n in gm.graph.nodes if n.target is channels_last_copy]
    assert len(copies) == (want == "copy")
    if want != "keep":
        assert isinstance(gm.core, MkldnnConv)
        if not norm:
            assert gm.last.layout == "to_contiguous"
    notes = " ".join(gm.meta[NOTES_KEY])
    assert ("kept in their layout" in notes) == (want == "keep")
    with torch.no_grad():
        out = gm(x)
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-4)
    assert out.is_contiguous()


def test_channels_last_copy_is_the_identity_where_it_does_not_apply() -> None:
    x = torch.randn(2, 4, 3, 5, 6)
    assert channels_last_copy(x) is x  # batch 2
    y = torch.randn(1, 4, 3, 5, 6)
    assert channels_last_copy(y).is_contiguous(memory_format=CL)
    torch.testing.assert_close(channels_last_copy(y), y, rtol=0, atol=0)
    assert torch.compile(channels_last_copy, backend="eager")(y).is_contiguous()  # compiled: none


def test_measuring_leaves_the_graphs_modules_alone_when_it_keeps_the_layout() -> None:
    torch.manual_seed(6)
    net = _Block(16, 8, norm=False).eval()
    x = torch.randn(1, 16, 32, 32, 32)
    gm = _prepared(net, x)
    core = gm.core
    ms = {"keep": 1.0, "to_channels_last": 2.0, "copy": 2.0}
    assert not ChannelsLastCores(timer=_timer(ms, []))(gm).modified
    assert gm.core is core and gm.first.layout == "keep" and gm.last.layout == "keep"


class _MixBlock(nn.Module):
    """A decoder's first factor over (up-sampled, skip) parts, as ``passes.cat_pointwise`` leaves it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = MixParts(torch.randn(8, 16, 1, 1, 1) / 4, torch.randn(8), keep=0)
        self.core = nn.Conv3d(8, 8, 3, padding=1)
        self.last = nn.Conv3d(8, 16, 1)

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(up, skip)))


class _Leaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, MixParts) or super().is_leaf_module(m, qualname)


def _trace_with_leaves(net: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(net, _Leaves().trace(net))


@pytest.mark.parametrize("fast", ["copy", "keep"])
def test_a_mixparts_first_factor_gets_the_copy_only(fast: str) -> None:
    torch.manual_seed(7)
    net = _MixBlock().eval()
    up, skip = torch.randn(1, 8, 32, 32, 32), torch.randn(1, 16, 32, 32, 32)
    gm = _trace_with_leaves(net)
    gm.last = PointwiseConv.from_conv(net.last)
    gm.recompile()
    propagate_shapes(gm, (up, skip))
    calls: list[str] = []
    ms = {"keep": 10.0, "copy": 5.0 if fast == "copy" else 12.0}
    assert ChannelsLastCores(timer=_timer(ms, calls))(gm).modified == (fast == "copy")
    assert sorted(calls) == ["copy", "keep"]  # no transposed product for a MixParts
    with torch.no_grad():
        torch.testing.assert_close(gm(up, skip), net(up, skip), rtol=1e-4, atol=1e-4)
    plain = _trace_with_leaves(net)
    propagate_shapes(plain, (up, skip))
    assert not ChannelsLastCores(measure=False)(plain).modified  # static rule: not at all



def test_the_copy_node_has_a_cost_formula() -> None:
    # measured, a block may get a channels_last_copy node: the analysis of the result must know it (seen
    # in CI: a U-Net decoder's block chose the copy there, and the analysis listed it as unsupported)
    torch.manual_seed(8)
    net = _Block(16, 8, norm=False).eval()
    x = torch.randn(1, 16, 32, 32, 32)
    gm = _prepared(net, x)
    ms = {"keep": 10.0, "to_channels_last": 30.0, "copy": 5.0}
    assert ChannelsLastCores(timer=_timer(ms, []))(gm).modified
    report = tucker_fx.analyze(gm, x)
    assert report.unsupported == []
    row = next(r for r in report.rows if "channels_last_copy" in r.name)
    assert row.kind == "free" and row.macs == 0


def test_a_noisy_measurement_is_taken_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import tucker_fx.passes.channels_last_cores as clc
    rounds: list[int] = []

    def fake(fns, repeats):  # type: ignore[no-untyped-def]
        rounds.append(repeats)
        if len(rounds) == 1:  # the first round: "keep" disturbed by another process
            return {k: ([10.0, 30.0, 10.5] if k == "keep" else [8.0, 8.1, 8.2]) for k in fns}
        return {k: ([10.0, 10.1, 10.2] if k == "keep" else [8.0, 8.1, 8.2]) for k in fns}

    monkeypatch.setattr(clc, "compare_samples", fake)
    ms = clc._measure({"keep": lambda: None, "copy": lambda: None}, 3)
    assert rounds == [3, 3] and ms == pytest.approx({"keep": 10.15, "copy": 8.1})  # medians of both rounds
    rounds.clear()
    monkeypatch.setattr(clc, "compare_samples", lambda fns, repeats: rounds.append(1) or {k: [1.0, 9.0] for k in fns})
    clc._measure({"keep": lambda: None}, 2)
    assert len(rounds) == 3  # at most twice again
