"""A tuned lowering times each candidate as it will run: with the kernels ``passes.fast_kernels`` gives
its plain convs, not ATen's own convs (which made the direct chain of narrow blocks lose to FFT
variants that then ran slower in the model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tucker_fx
from tucker_fx.kernels import native
from tucker_fx.kernels.narrow_conv import NarrowConv3d
from tucker_fx.kernels.pointwise import MkldnnConv, PointwiseConv
from tucker_fx.passes import lowering
from tucker_fx.passes.blocks import TuckerBlock
from tucker_fx.passes.lowering import as_run


def test_as_run_swaps_what_fast_kernels_would_and_keeps_the_function() -> None:
    torch.manual_seed(0)
    block = TuckerBlock(nn.Conv3d(16, 4, 1), nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 16, 1),
                        kind="tucker2", ranks=(4, 4)).eval()
    x = torch.randn(1, 16, 8, 8, 8)
    run = as_run(block, x)
    core = NarrowConv3d if native.available() else MkldnnConv  # 4 -> 4: narrow (kernels.narrow_conv)
    assert [type(m) for m in (run.first, run.core, run.last)] == [PointwiseConv, core, PointwiseConv]
    assert [type(m) for m in (block.first, block.core, block.last)] == [nn.Conv3d] * 3  # untouched
    with torch.no_grad():
        torch.testing.assert_close(run(x), block(x), rtol=1e-5, atol=1e-5)


def test_as_run_leaves_a_conv_inside_a_wrapper_as_the_graph_will() -> None:
    # fast_kernels sees graph nodes: the conv inside ChannelsLast stays ATen's (on an AMD EPYC 4 -> 4 at
    # 64^3 took 200 ms so, 8 ms on mkldnn: timed as mkldnn, every SegResNet block chose it, and ran 5x slower)
    block = TuckerBlock(nn.Conv3d(16, 4, 1), lowering.ChannelsLast(nn.Conv3d(4, 4, 3, padding=1)), nn.Conv3d(4, 16, 1),
                        kind="tucker2", ranks=(4, 4)).eval()
    run = as_run(block, torch.randn(1, 16, 8, 8, 8))
    assert type(run.core.conv) is nn.Conv3d and type(run.first) is PointwiseConv


def test_as_run_returns_the_module_where_nothing_applies() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)  # ATen already gives 2-d convs to mkldnn
    assert as_run(conv, torch.randn(1, 3, 16, 16)) is conv
    pw = nn.Conv3d(8, 4, 1)
    assert isinstance(as_run(pw, torch.randn(1, 8, 8, 8, 8)), PointwiseConv)  # a bare conv is swapped whole


@pytest.mark.parametrize("tune", [True, False])
def test_tuned_block_lowering_times_the_fast_kernels(tune: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[set[str]] = []
    choose = lowering._Chooser.choose

    def spy(self, cands, x, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append({type(m).__name__ for c in cands.values() for m in c.modules()})
        return choose(self, cands, x, *args, **kwargs)

    monkeypatch.setattr(lowering._Chooser, "choose", spy)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 16, 8, 8, 8)
    r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, tune=tune,
                                                                 tuning_cache=False, tuning_repeats=1,
                                                                 keep_original_if_faster=False))
    if tune:
        core = "NarrowConv3d" if native.available() else "MkldnnConv"  # 16 -> 4 -> 4 -> 16: a narrow core
        assert seen and {"PointwiseConv", core} <= seen[0]
    else:
        assert not seen  # the cost model: nothing timed
    plain = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, lowering="none"))
    with torch.no_grad():  # whichever variant won, the same function as the plain decomposition
        torch.testing.assert_close(r.module(x), plain.module(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last_input", [False, True])
def test_channels_last_variant_hands_on_the_layout_it_was_given(channels_last_input: bool) -> None:
    torch.manual_seed(2)
    conv = nn.Conv3d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 7, 8)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        y = lowering.ChannelsLast(conv)(x)
        torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    if not channels_last_input:  # a contiguous map in, a contiguous map out: the layout does not leak
        assert y.is_contiguous()
