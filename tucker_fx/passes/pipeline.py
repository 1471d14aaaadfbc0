"""The passes of ``compress`` and ``lower``, declared.

Each :class:`~tucker_fx.passes.runner.Stage` names its pass, builds it from the
:class:`~tucker_fx.TuckerConfig` (or is off under it), and declares the facts it ``requires``
of the graph, ``provides`` and ``invalidates`` (when it modifies the graph). A
:class:`~tucker_fx.passes.runner.PipelineRun` runs a list of stages: it checks each stage's
requirements before the stage runs, re-establishes the ones it can (shapes, analysis records)
when an earlier pass left them stale, and raises a :class:`~tucker_fx.passes.runner.PassError`
naming the stage and the missing fact otherwise.

The facts (:data:`FACTS`):

- ``shapes``: ``node.meta["tensor_meta"]`` (fake-tensor shape propagation on the example inputs);
- ``sites``: the analysis records ``SITE_KEY``/``COST_KEY`` on the nodes (``annotate_costs``);
- ``plan``: the :class:`~tucker_fx.Plan` in ``gm.meta[PLAN_KEY]`` (put there by ``compress`` /
  ``apply_plan`` after planning);
- ``originals``: the layer each Tucker block replaced, in ``gm.meta[ORIGINALS_KEY]``; written by
  the rewrite, read by block lowering, dropped when the pipeline ends.

The pipelines:

- :data:`COMPRESS` = :data:`PREPARE` (BatchNorm folding) then planning (by the caller: it needs
  the analysis of the folded graph, and a plan with nothing to decompose ends there) then
  :data:`DECOMPOSE` (rewrite, block lowering, max-pool first, max pools in fast layouts, merge of
  linear maps, zero-width pads dropped, up-sampling as matrix products, fast kernels for the convs
  left);
- :data:`LOWER` = :data:`PREPARE` then the lowering of the plain model (each conv's variant,
  max-pool first, window max, merge): ``tucker_fx.lower``, the fair baseline.

Other state between passes travels in ``gm.meta`` too: the pass notes (``NOTES_KEY``) and the
lowering choices of ``lower`` (``LOWERING_KEY``).

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx import TuckerConfig
    >>> from tucker_fx.passes.pipeline import LOWER, pipeline_run
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> run = pipeline_run(TuckerConfig(tuning_cache=False), (x,), holds=())
    >>> gm = run.run(torch.fx.symbolic_trace(net), LOWER)
    >>> run.ran
    ['fold_batchnorm', 'lower_convs', 'pool_before_activation', 'lower_max_pools', 'merge_linear', 'drop_noop_pads', 'separable_interpolate', 'fast_kernels', 'cat_into_pointwise', 'fold_norm_into_pointwise', 'channels_last_cores', 'fuse_pointwise_chains', 'write_in_place', 'plan_workspace']
    >>> bool(torch.allclose(gm(x), net(x), atol=1e-6))
    True
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from tucker_fx._internal.meta import ORIGINALS_KEY, PLAN_KEY
from tucker_fx.analysis.costs import annotate_costs
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.config import TuckerConfig
from tucker_fx.passes.cat_pointwise import CatIntoPointwise
from tucker_fx.passes.channels_last_cores import ChannelsLastCores
from tucker_fx.passes.fast_kernels import UseFastKernels
from tucker_fx.passes.fold_bn import FoldBatchNorm
from tucker_fx.passes.inplace import WriteInPlace
from tucker_fx.passes.lowering import LowerBlocks, LowerConvs, LowerMaxPools
from tucker_fx.passes.merge_linear import MergeLinear
from tucker_fx.passes.noop_pads import DropNoOpPads
from tucker_fx.passes.norm_fold import FoldNormIntoPointwise
from tucker_fx.passes.pointwise_chain import FusePointwiseChains
from tucker_fx.passes.resample import UseSeparableInterpolate
from tucker_fx.passes.pool_first import PoolBeforeActivation
from tucker_fx.passes.runner import Fact, PipelineRun, Stage, StageContext, check_stages
from tucker_fx.passes.tucker_rewrite import TuckerRewrite
from tucker_fx.passes.workspace import PlanWorkspace

__all__ = [
    "SHAPES", "SITES", "PLAN", "ORIGINALS", "FACTS",
    "FOLD_BN", "REWRITE", "LOWER_BLOCKS", "POOL_FIRST", "LOWER_MAX_POOLS", "MERGE", "LOWER_CONVS", "DROP_PADS",
    "SEPARABLE_INTERPOLATE",
    "FAST_KERNELS", "CAT_INTO_POINTWISE", "FOLD_NORMS", "CHANNELS_LAST_CORES", "WRITE_IN_PLACE", "PLAN_WORKSPACE",
    "PREPARE", "DECOMPOSE", "COMPRESS", "LOWER", "pipeline_run",
]

SHAPES, SITES, PLAN, ORIGINALS = "shapes", "sites", "plan", "originals"

FACTS: dict[str, Fact] = {
    SHAPES: Fact(SHAPES, "node.meta['tensor_meta'] from shape propagation on the example inputs",
                 establish=lambda gm, inputs: propagate_shapes(gm, inputs)),
    SITES: Fact(SITES, "the analysis records (sites and costs) on the nodes, from annotate_costs",
                establish=lambda gm, inputs: annotate_costs(gm), needs=(SHAPES,)),
    PLAN: Fact(PLAN, f"the plan in gm.meta[{PLAN_KEY!r}]", meta_key=PLAN_KEY),
    ORIGINALS: Fact(ORIGINALS, f"the original layers of the Tucker blocks in gm.meta[{ORIGINALS_KEY!r}], "
                               "written by the rewrite", meta_key=ORIGINALS_KEY, transient=True),
}
"""The facts a stage may require, provide or invalidate."""


def _lowering(config: TuckerConfig) -> bool:
    return config.lowering == "auto"


def _fold_bn(ctx: StageContext) -> Optional[FoldBatchNorm]:
    return FoldBatchNorm() if ctx.config.fold_bn else None


def _rewrite(ctx: StageContext) -> TuckerRewrite:
    c = ctx.config
    return TuckerRewrite(ctx.meta(PLAN_KEY), hooi_iters=c.hooi_iters, solver=c.tucker_solver, progress=ctx.progress)


def _lower_blocks(ctx: StageContext) -> Optional[LowerBlocks]:
    c = ctx.config
    if not _lowering(c):
        return None
    return LowerBlocks(ctx.meta(PLAN_KEY), tune=c.tune, cache=ctx.cache(), repeats=c.tuning_repeats,
                       tolerance=c.lowering_tolerance, allow_original=c.keep_original_if_faster,
                       progress=ctx.progress)


def _pool_first(ctx: StageContext) -> Optional[PoolBeforeActivation]:
    return PoolBeforeActivation() if _lowering(ctx.config) else None


def _lower_max_pools(ctx: StageContext) -> Optional[LowerMaxPools]:
    c = ctx.config
    return LowerMaxPools(tune=c.tune, cache=ctx.cache(), repeats=c.tuning_repeats) if _lowering(c) else None


def _merge(ctx: StageContext) -> Optional[MergeLinear]:
    return MergeLinear() if ctx.config.merge else None


def _drop_pads(ctx: StageContext) -> Optional[DropNoOpPads]:
    return DropNoOpPads() if _lowering(ctx.config) else None


def _separable_interpolate(ctx: StageContext) -> Optional[UseSeparableInterpolate]:
    return UseSeparableInterpolate() if _lowering(ctx.config) else None


def _fast_kernels(ctx: StageContext) -> Optional[UseFastKernels]:
    return UseFastKernels() if _lowering(ctx.config) else None


def _cat_into_pointwise(ctx: StageContext) -> Optional[CatIntoPointwise]:
    return CatIntoPointwise() if _lowering(ctx.config) else None


def _fold_norms(ctx: StageContext) -> Optional[FoldNormIntoPointwise]:
    return FoldNormIntoPointwise() if _lowering(ctx.config) else None


def _channels_last_cores(ctx: StageContext) -> Optional[ChannelsLastCores]:
    return ChannelsLastCores() if _lowering(ctx.config) else None


def _fuse_pointwise_chains(ctx: StageContext) -> Optional[FusePointwiseChains]:
    return FusePointwiseChains() if _lowering(ctx.config) else None


def _write_in_place(ctx: StageContext) -> Optional[WriteInPlace]:
    return WriteInPlace() if _lowering(ctx.config) else None


def _plan_workspace(ctx: StageContext) -> Optional[PlanWorkspace]:
    return PlanWorkspace() if _lowering(ctx.config) else None


def _lower_convs(ctx: StageContext) -> Optional[LowerConvs]:
    c = ctx.config
    if not _lowering(c):
        return None
    return LowerConvs(tune=c.tune, cache=ctx.cache(), repeats=c.tuning_repeats, tolerance=c.lowering_tolerance)


def _lower_kept_convs(ctx: StageContext) -> Optional[LowerConvs]:
    c = ctx.config
    if not _lowering(c):
        return None
    return LowerConvs(tune=c.tune, cache=ctx.cache(), repeats=c.tuning_repeats, tolerance=c.lowering_tolerance,
                      kept_only=True, name="lower_kept_convs")


FOLD_BN = Stage("fold_batchnorm", _fold_bn, invalidates=(SHAPES, SITES),
                doc="eval-mode BatchNorm folded into the conv/linear before it (config.fold_bn)")
REWRITE = Stage("tucker_rewrite", _rewrite, requires=(PLAN, SITES), provides=(ORIGINALS,), invalidates=(SHAPES, SITES),
                doc="each planned layer becomes its Tucker block")
LOWER_BLOCKS = Stage("lower_blocks", _lower_blocks, requires=(PLAN, ORIGINALS, SHAPES), invalidates=(SITES,),
                     doc="each block runs as its fastest variant (config.lowering='auto'); the node that replaces "
                         "a block carries the block's output tensor_meta")
POOL_FIRST = Stage("pool_before_activation", _pool_first, invalidates=(SITES,),
                   doc="max-pooling moved before monotone activations (config.lowering='auto'); keeps tensor_meta")
LOWER_MAX_POOLS = Stage("lower_max_pools", _lower_max_pools, requires=(SHAPES,), invalidates=(SITES,),
                        doc="tiling max pools run as WindowMax where faster (config.lowering='auto')")
MERGE = Stage("merge_linear", _merge, requires=(SHAPES,), invalidates=(SITES,),
              doc="adjacent linear maps merged where MACs drop (config.merge); merged nodes carry tensor_meta")
LOWER_CONVS = Stage("lower_convs", _lower_convs, requires=(SHAPES,), invalidates=(SITES,),
                    doc="each plain conv runs as its fastest variant (config.lowering='auto'); choices in "
                        "gm.meta[LOWERING_KEY]")

DROP_PADS = Stage("drop_noop_pads", _drop_pads, invalidates=(SITES,),
                  doc="zero-width pads of a tensor nothing else uses dropped (config.lowering='auto'); keeps tensor_meta")
SEPARABLE_INTERPOLATE = Stage("separable_interpolate", _separable_interpolate, requires=(SHAPES,),
                              invalidates=(SITES,),
                              doc="linear/bilinear/trilinear up-sampling as per-axis matrix products where the rule "
                                  "says they win (config.lowering='auto'); keeps tensor_meta")
FAST_KERNELS = Stage("fast_kernels", _fast_kernels, requires=(SHAPES,), invalidates=(SITES,),
                     doc="1x1 convs as matmul and narrow 3-d convs on mkldnn, where ATen's own choice is slow "
                         "(config.lowering='auto'); keeps tensor_meta")

LOWER_KEPT_CONVS = Stage("lower_kept_convs", _lower_kept_convs, requires=(SHAPES,), invalidates=(SITES,),
                         doc="the convs a compression left alone get the lowering tucker_fx.lower gives them "
                             "(config.lowering='auto')")
CAT_INTO_POINTWISE = Stage("cat_into_pointwise", _cat_into_pointwise, requires=(SHAPES,), invalidates=(SITES,),
                           doc="a channel cat read only by 1x1 convs is not built: they take its parts "
                               "(config.lowering='auto')")

FOLD_NORMS = Stage("fold_norm_into_pointwise", _fold_norms, invalidates=(SITES,),
                   doc="a GroupNorm/InstanceNorm after a widening 1x1 conv computed from the conv's input "
                       "(config.lowering='auto'); keeps tensor_meta")
CHANNELS_LAST_CORES = Stage("channels_last_cores", _channels_last_cores, requires=(SHAPES,), invalidates=(SITES,),
                            doc="3-d core convs of 8+ channels at 32^3+ positions run on channels-last data, which "
                                "their factors write and read for free (config.lowering='auto')")
FUSE_POINTWISE_CHAINS = Stage("fuse_pointwise_chains", _fuse_pointwise_chains, invalidates=(SITES,),
                               doc="a widening 1x1 product, its ReLU/LeakyReLU and a narrowing 1x1 product as one "
                                   "native node, the wide map never written (config.lowering='auto'); keeps "
                                   "tensor_meta")
WRITE_IN_PLACE = Stage("write_in_place", _write_in_place, invalidates=(SITES,),
                       doc="InstanceNorms and adds write into a buffer only they read "
                           "(config.lowering='auto'); keeps tensor_meta")

PLAN_WORKSPACE = Stage("plan_workspace", _plan_workspace, requires=(SHAPES,),
                       doc="the large maps of the 1x1 kernels written into buffers reused from call to call, "
                           "shared between maps never alive together (config.lowering='auto'); the graph is unchanged")

PREPARE: tuple[Stage, ...] = (FOLD_BN,)
"""Before planning: the planner sees the folded layers."""
DECOMPOSE: tuple[Stage, ...] = (REWRITE, LOWER_BLOCKS, LOWER_KEPT_CONVS, POOL_FIRST, LOWER_MAX_POOLS, MERGE, DROP_PADS, SEPARABLE_INTERPOLATE,
                                  FAST_KERNELS, CAT_INTO_POINTWISE, FOLD_NORMS, CHANNELS_LAST_CORES, FUSE_POINTWISE_CHAINS,
                                  WRITE_IN_PLACE,
                                  PLAN_WORKSPACE)
"""After planning (requires the plan in ``gm.meta``)."""
COMPRESS: tuple[Stage, ...] = PREPARE + DECOMPOSE
"""``compress`` and ``apply_plan``: :data:`PREPARE`, planning, :data:`DECOMPOSE`."""
LOWER: tuple[Stage, ...] = PREPARE + (LOWER_CONVS, POOL_FIRST, LOWER_MAX_POOLS, MERGE, DROP_PADS, SEPARABLE_INTERPOLATE,
                                  FAST_KERNELS, CAT_INTO_POINTWISE, FOLD_NORMS, CHANNELS_LAST_CORES, FUSE_POINTWISE_CHAINS,
                                  WRITE_IN_PLACE,
                                  PLAN_WORKSPACE)
"""``lower``: the same lowering passes on the undecomposed model."""

_ANALYSED = (SHAPES, SITES)  # what a freshly analysed capture holds
check_stages(PREPARE, FACTS, given=_ANALYSED)
check_stages(DECOMPOSE, FACTS, given=_ANALYSED + (PLAN,))
check_stages(LOWER, FACTS, given=_ANALYSED)


def pipeline_run(config: TuckerConfig, example_inputs: Optional[tuple], *, holds: Iterable[str] = _ANALYSED,
                 progress: Optional[Any] = None) -> PipelineRun:
    """A :class:`~tucker_fx.passes.runner.PipelineRun` over :data:`FACTS`; ``holds`` defaults to what
    a freshly analysed capture holds (shapes and sites).

    Example:
        >>> import torch
        >>> from tucker_fx import TuckerConfig
        >>> pipeline_run(TuckerConfig(), (torch.randn(1, 3),)).holds(torch.fx.symbolic_trace(torch.nn.ReLU()), "shapes")
        True
    """
    return PipelineRun(config, example_inputs, FACTS, holds=holds, progress=progress)
