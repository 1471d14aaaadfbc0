"""The declared pipeline: stages, preconditions checked by the runner, state in ``gm.meta``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import tucker_fx
from tucker_fx import TuckerConfig
from tucker_fx._internal.meta import LOWERING_KEY, ORIGINALS_KEY, PLAN_KEY
from tucker_fx.analysis import annotate_costs, propagate_shapes
from tucker_fx.passes.lowering import LowerBlocks
from tucker_fx.passes.pipeline import (COMPRESS, DECOMPOSE, FACTS, LOWER, LOWER_BLOCKS, MERGE, PREPARE, REWRITE,
                                       SHAPES, pipeline_run)
from tucker_fx.passes.runner import PassError, PassResult, Stage, check_stages
from tucker_fx.planning import build_plan


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 8)).eval()


X = torch.randn(2, 4, 8, 8)
QUIET = TuckerConfig(rank=0.5, only_if_cheaper=False, validate=False, tuning_cache=False, progress=False)


def _analysed(model: nn.Module) -> fx.GraphModule:
    gm = fx.symbolic_trace(copy.deepcopy(model))
    propagate_shapes(gm, (X,))
    annotate_costs(gm)
    return gm


def test_pipelines_are_declared_in_order() -> None:
    assert [s.name for s in COMPRESS] == ["fold_batchnorm", "tucker_rewrite", "lower_blocks", "lower_kept_convs",
                                          "pool_before_activation", "lower_max_pools", "merge_linear",
                                          "drop_noop_pads", "separable_interpolate", "fast_kernels",
                                          "cat_into_pointwise", "fold_norm_into_pointwise", "channels_last_cores",
                                          "fuse_pointwise_chains", "write_in_place", "plan_workspace"]
    assert [s.name for s in LOWER] == ["fold_batchnorm", "lower_convs", "pool_before_activation",
                                       "lower_max_pools", "merge_linear", "drop_noop_pads", "separable_interpolate", "fast_kernels",
                                       "cat_into_pointwise", "fold_norm_into_pointwise", "channels_last_cores",
                                       "fuse_pointwise_chains", "write_in_place", "plan_workspace"]
    check_stages(DECOMPOSE, FACTS, given=("shapes", "sites", "plan"))
    with pytest.raises(PassError, match="'tucker_rewrite' requires 'plan'"):
        check_stages(COMPRESS, FACTS, given=("shapes", "sites"))  # planning runs between PREPARE and DECOMPOSE


def test_runner_names_the_pass_and_the_missing_precondition() -> None:
    gm = _analysed(_net())
    with pytest.raises(PassError, match=r"'tucker_rewrite' requires 'plan'"):
        pipeline_run(QUIET, (X,)).run(gm, DECOMPOSE)
    with pytest.raises(PassError, match=r"'lower_blocks' requires 'originals'"):
        gm.meta[PLAN_KEY] = build_plan(gm, QUIET)
        pipeline_run(QUIET, (X,)).run(gm, [LOWER_BLOCKS])
    with pytest.raises(PassError, match="expected example inputs"):
        pipeline_run(QUIET, None, holds=()).run(_analysed(_net()), [MERGE])


def test_runner_repropagates_stale_shapes_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    import tucker_fx.passes.pipeline as pipeline

    calls = []
    original = pipeline.FACTS[SHAPES].establish
    monkeypatch.setitem(pipeline.FACTS, SHAPES, pipeline.FACTS[SHAPES].__class__(
        SHAPES, "shapes", establish=lambda gm, x: (calls.append(1), original(gm, x))))

    def touch(gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, True)

    stale = Stage("touch", lambda ctx: touch, invalidates=(SHAPES,))
    needs = Stage("needs", lambda ctx: touch, requires=(SHAPES,))
    run = pipeline_run(QUIET, (X,))
    run.run(_analysed(_net()), [needs, stale, stale, needs, needs])
    assert calls == [1] and run.ran == ["needs", "touch", "touch", "needs", "needs"]
    run = pipeline_run(QUIET, (X,))
    run.run(_analysed(_net()), [stale, Stage("off", lambda ctx: None, requires=(SHAPES,))])
    assert calls == [1]  # a stage the config turns off needs nothing


def test_state_travels_in_gm_meta_and_handover_is_dropped() -> None:
    model = _net()
    gm = _analysed(model)
    run = pipeline_run(QUIET, (X,))
    gm = run.run(gm, PREPARE)
    run.ensure(gm, "sites")
    plan = build_plan(gm, QUIET)
    gm.meta[PLAN_KEY] = plan
    seen = {}

    def spy(gm: fx.GraphModule) -> PassResult:
        seen.update(gm.meta[ORIGINALS_KEY])
        return PassResult(gm, False)

    gm = run.run(gm, [REWRITE, Stage("spy", lambda ctx: spy, requires=("originals",))])
    assert set(seen) == {e.name for e in plan.applied} and all(isinstance(m, nn.Module) for m in seen.values())
    assert ORIGINALS_KEY not in gm.meta
    result = tucker_fx.compress(model, X, config=QUIET)
    assert ORIGINALS_KEY not in result.module.meta and result.module.meta[PLAN_KEY] is result.plan


def test_lower_blocks_refuses_a_block_without_shapes() -> None:
    gm = _analysed(_net())
    plan = build_plan(gm, QUIET)
    gm.meta[PLAN_KEY] = plan
    gm = pipeline_run(QUIET, (X,)).run(gm, [REWRITE])
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    with pytest.raises(PassError, match="lower_blocks.*no input shape"):
        LowerBlocks(plan, tune=False)(gm)


def test_lower_takes_a_config() -> None:
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = tucker_fx.lower(model, X, config=TuckerConfig(tuning_cache=False))
    assert all(c["source"] == "cost model" for c in gm.meta[LOWERING_KEY].values())  # tune=False by default
    assert torch.allclose(gm(X), model(X), atol=1e-5)
    plain = tucker_fx.lower(model, X, config=TuckerConfig(lowering="none", merge=False, fold_bn=False))
    assert plain.meta[LOWERING_KEY] == {} and any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def test_lower_old_keywords_still_work_with_a_warning() -> None:
    model = _net()
    with pytest.warns(DeprecationWarning, match=r"config=TuckerConfig\(tune=False, tuning_cache=False\)"):
        old = tucker_fx.lower(model, X, tune=False, tuning_cache=False)
    new = tucker_fx.lower(model, X, config=TuckerConfig(tune=False, tuning_cache=False))
    assert old.code == new.code and old.meta[LOWERING_KEY] == new.meta[LOWERING_KEY]
    with pytest.raises(TypeError, match="unexpected keyword argument 'tunes'"):
        tucker_fx.lower(model, X, tunes=False)
    with pytest.raises(TypeError, match="config must be a TuckerConfig"):
        tucker_fx.lower(model, X, config={"tune": False})


def test_compress_lowers_the_convs_it_leaves_alone_as_lower_does() -> None:
    # a big-kernel conv left as it is (excluded) runs as the FFT conv that tucker_fx.lower gives it, not as
    # ATen's direct conv: compress is never slower on a layer it did not touch than the fair baseline
    import tucker_fx
    from tucker_fx import TuckerConfig
    from tucker_fx._internal.meta import NOTES_KEY
    from tucker_fx.kernels.fft_conv import FFTConv

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(4, 6, (5, 11, 11), padding=(2, 5, 5)), nn.ReLU(),
                        nn.Conv3d(6, 16, 3, padding=1)).eval()
    x = torch.randn(1, 4, 8, 40, 64)
    r = tucker_fx.compress(net, x, config=TuckerConfig(rank=0.5, exclude=("0",), progress=False, speed_check=False))
    lowered = tucker_fx.lower(net, x, config=TuckerConfig(progress=False))
    assert isinstance(lowered.get_submodule("0"), FFTConv)  # the premise
    assert isinstance(r.module.get_submodule("0"), FFTConv)
    assert any("convs left as they are, lowered" in n and "0 -> fft" in n for n in r.module.meta[NOTES_KEY])
    assert not r.plan["0"].applied
    with torch.no_grad():
        assert torch.allclose(r.module.get_submodule("0")(x), net[0](x), atol=1e-4)
