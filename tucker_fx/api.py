"""The verbs: ``compress`` a model, ``apply_plan`` a saved or edited plan.

Example:
    >>> import torch, tucker_fx
    >>> from tucker_fx.models import thetis_net, thetis_paper_config, THETIS_INPUT_SHAPE
    >>> result = tucker_fx.compress(thetis_net(), torch.randn(THETIS_INPUT_SHAPE), config=thetis_paper_config())
    >>> result.before.total_params, result.after.total_params
    (696428, 13598)
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch

import torch.fx as fx
import torch.nn as nn

from tucker_fx.analysis.capture import capture
from tucker_fx.analysis.costs import CostReport, annotate_costs
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.config import TuckerConfig
from tucker_fx.errors import DecompositionError
from tucker_fx.passes.fold_bn import FoldBatchNorm
from tucker_fx.passes.lowering import LowerBlocks, LowerConvs, LowerMaxPools
from tucker_fx.passes.merge_linear import MergeLinear
from tucker_fx.passes.pool_first import PoolBeforeActivation
from tucker_fx.passes.runner import run_passes
from tucker_fx.passes.tucker_rewrite import TuckerRewrite
from tucker_fx.planning.plan import KINDS, Plan
from tucker_fx.planning.planner import build_plan
from tucker_fx.reporting.progress import Progress
from tucker_fx.reporting.validation import ValidationReport, check_runnable_inputs, validate
from tucker_fx.tuning.cache import TimingCache

__all__ = ["CompressionResult", "compress", "apply_plan", "lower", "model_signature", "PLAN_META_KEY"]

PLAN_META_KEY = "tucker_fx.plan"


@dataclass
class CompressionResult:
    """``module``: the compressed GraphModule; ``plan``: what was done per layer;
    ``before``/``after``: cost reports; ``validation``: errors against the original (or None);
    ``compiled``: ``torch.compile(module)`` when ``TuckerConfig(inductor=True)``; ``exported``: the
    compressed model re-exported, when ``compress`` was given a ``torch.export.ExportedProgram``;
    ``config``: the config used; ``source``: what the original model looked like
    (:func:`model_signature`), which ``tucker_fx.save`` records."""

    module: fx.GraphModule
    plan: Plan
    before: CostReport
    after: CostReport
    validation: Optional[ValidationReport]
    compiled: Optional[Callable[..., Any]] = None
    exported: Optional[Any] = None  # a torch.export.ExportedProgram when one was compressed
    config: Optional[TuckerConfig] = None
    source: Optional[dict[str, Any]] = None

    @property
    def params_ratio(self) -> float:
        return self.before.total_params / max(self.after.total_params, 1)

    @property
    def flops_ratio(self) -> float:
        return self.before.total_flops / max(self.after.total_flops, 1)

    def summary(self) -> str:
        lines = [
            self.plan.to_markdown(),
            "",
            f"params {self.before.total_params:,} -> {self.after.total_params:,} (x{self.params_ratio:.2f}); "
            f"FLOPs {self.before.total_flops:,} -> {self.after.total_flops:,} (x{self.flops_ratio:.2f})",
        ]
        if self.validation is not None:
            lines.append(f"validation: {self.validation}")
        return "\n".join(lines)


def _check_inputs(fn: str, model: Any, example_inputs: tuple) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects a torch.nn.Module, fx.GraphModule or torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    if not example_inputs:
        raise ValueError(f"{fn} needs example inputs, e.g. {fn}(model, torch.randn(1, 3, 16, 112, 112))")


def _unpack_exported(fn: str, ep: "torch.export.ExportedProgram", example_inputs: tuple) -> tuple[nn.Module, tuple]:
    """``ep.module()`` and the example inputs: those given, else the ones ``ep`` was exported with."""
    if example_inputs:
        return ep.module(), tuple(example_inputs)
    stored = getattr(ep, "example_inputs", None)
    if stored is None:
        raise ValueError(f"{fn}: this ExportedProgram carries no example inputs; expected them as arguments, "
                         f"e.g. {fn}(ep, torch.randn(1, 3, 16, 112, 112))")
    args, kwargs = stored
    if kwargs:
        raise ValueError(f"{fn}: the ExportedProgram was exported with keyword inputs {sorted(kwargs)}; expected "
                         f"positional example inputs: pass them, e.g. {fn}(ep, x)")
    return ep.module(), tuple(args)


def _exported_dynamic_shapes(ep: "torch.export.ExportedProgram") -> Optional[Any]:
    """``ep``'s dynamic dimensions as a ``dynamic_shapes`` spec for its inputs, or None if all are static.

    A dimension that is a plain symbol becomes a ``Dim`` with the program's range (one ``Dim`` per
    symbol, so equal sizes stay equal), a linear one (``2*s0 + 1``) the same expression of that
    ``Dim``, any other ``Dim.AUTO``."""
    import sympy
    from torch.export import Dim
    from torch.utils._pytree import tree_unflatten
    from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

    def finite(bound: Any) -> Optional[int]:
        return None if isinstance(bound, (IntInfinity, NegativeIntInfinity)) or not bound.is_finite else int(bound)

    dims: dict[Any, Any] = {}

    def dim_of(expr: Any) -> Any:
        """The ``Dim`` of a symbol, ``a * Dim + c`` of a linear expression in one, else ``Dim.AUTO``."""
        if len(expr.free_symbols) != 1:
            return Dim.AUTO
        (sym,) = expr.free_symbols
        if sym not in dims:
            vr = ep.range_constraints.get(sym)
            low, high = (None, None) if vr is None else (finite(vr.lower), finite(vr.upper))
            dims[sym] = Dim(str(sym), min=low, max=high)
        poly = sympy.Poly(expr, sym)
        if poly.degree() != 1 or not all(c.is_Integer for c in poly.all_coeffs()):
            return Dim.AUTO
        a, c = (int(v) for v in poly.all_coeffs())
        return dims[sym] if (a, c) == (1, 0) else a * dims[sym] + c

    values = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    leaves: list[Any] = []
    for name in ep.graph_signature.user_inputs:
        val = values.get(name)
        shape = val.shape if isinstance(val, torch.Tensor) else ()
        spec = {i: dim_of(size.node.expr) for i, size in enumerate(shape) if isinstance(size, torch.SymInt)}
        leaves.append(spec or None)
    if not any(leaves):
        return None
    args, kwargs = tree_unflatten(leaves, ep.call_spec.in_spec)
    return tuple(args) if not kwargs else None


def _reexport(result: "CompressionResult", ep: "torch.export.ExportedProgram", example_inputs: tuple) -> None:
    """``result.exported``: the compressed module exported again, with ``ep``'s dynamic dimensions."""
    dynamic = _exported_dynamic_shapes(ep)
    try:
        result.exported = torch.export.export(result.module, example_inputs, dynamic_shapes=dynamic)
    except Exception as exc:
        if dynamic is None:
            raise
        raise ValueError(
            f"the compressed model does not re-export with the program's dynamic shapes {dynamic}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}; "
            "expected a compressed graph without these sizes baked in; export result.module yourself, with "
            "the dynamic_shapes it allows or with static shapes"
        ) from exc


def model_signature(model: nn.Module, example_inputs: tuple) -> dict[str, Any]:
    """What a model looks like, as plain data: its class, each state-dict tensor's shape and
    dtype, each submodule's training flag, and the example inputs' shapes and dtypes.

    Reads only names, shapes and flags (no values); the model is not changed.

    Example:
        >>> import torch, torch.nn as nn
        >>> sig = model_signature(nn.Linear(3, 2), (torch.empty(4, 3),))
        >>> sig["class"], sig["tensors"]["weight"], sig["inputs"]
        ('Linear', {'shape': [2, 3], 'dtype': 'float32'}, [{'shape': [4, 3], 'dtype': 'float32'}])
    """
    def describe(t: Any) -> dict[str, Any]:
        if isinstance(t, torch.Tensor):
            return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        return {"shape": [], "dtype": type(t).__name__}

    tensors = {name: describe(t) for name, t in model.state_dict(keep_vars=True).items()
               if isinstance(t, torch.Tensor)}
    return {
        "class": type(model).__name__,
        "tensors": tensors,
        "training": {name: m.training for name, m in model.named_modules()},
        "inputs": [describe(a) for a in example_inputs],
    }


def _analysed_copy(model: nn.Module, example_inputs: tuple) -> tuple[fx.GraphModule, CostReport]:
    gm = capture(model, copy_weights=True)
    propagate_shapes(gm, example_inputs)
    return gm, annotate_costs(gm)


def _prepare(gm: fx.GraphModule, example_inputs: tuple, config: TuckerConfig) -> tuple[fx.GraphModule, Optional[fx.GraphModule]]:
    """Keep a reference copy for validation, then fold BatchNorm and re-annotate."""
    reference = copy.deepcopy(gm) if config.validate else None
    if config.fold_bn:
        gm = run_passes(gm, [FoldBatchNorm()])
        propagate_shapes(gm, example_inputs)
        annotate_costs(gm)
    return gm, reference


def _cache(config: TuckerConfig) -> Optional[TimingCache]:
    if config.tuning_cache is False:
        return None
    return TimingCache(None if config.tuning_cache is True else config.tuning_cache)


def _nothing_to_do(model: nn.Module, plan: Plan, example_inputs: tuple, config: TuckerConfig) -> CompressionResult:
    """No layer to decompose: the model as traced, with no pass applied (no BatchNorm folding,
    lowering or merge either), and a plan that says why."""
    if not plan.layers:
        plan.notes.append("the model has no conv or linear layer (nn.Conv1d/2d/3d, nn.ConvTranspose*, nn.Linear "
                          "or their functional forms): nothing to decompose; the model is returned as traced")
    else:
        plan.notes.append("no layer is to be decomposed (each layer's reason is in its row); the model is "
                          "returned as traced, with no pass applied")
    gm, report = _analysed_copy(model, example_inputs)
    gm.meta[PLAN_META_KEY] = plan
    validation = validate(gm, gm, *example_inputs) if config.validate else None
    compiled = torch.compile(gm) if config.inductor else None
    return CompressionResult(gm, plan, report, report, validation, compiled, config=config)


def _finish(model: nn.Module, gm: fx.GraphModule, reference: Optional[fx.GraphModule], plan: Plan,
            before: CostReport, example_inputs: tuple, config: TuckerConfig, progress: Progress) -> CompressionResult:
    if not plan.applied:
        return _nothing_to_do(model, plan, example_inputs, config)
    rewrite = TuckerRewrite(plan, hooi_iters=config.hooi_iters, solver=config.tucker_solver, progress=progress)
    gm = run_passes(gm, [rewrite])
    propagate_shapes(gm, example_inputs)
    passes: list = []
    if config.lowering == "auto":
        cache = _cache(config) if config.tune else None  # one cache object for every tuning pass
        passes.append(LowerBlocks(plan, rewrite.originals, tune=config.tune, cache=cache,
                                  repeats=config.tuning_repeats, tolerance=config.lowering_tolerance,
                                  allow_original=config.keep_original_if_faster,
                                  progress=progress))
        passes += [PoolBeforeActivation(), LowerMaxPools(tune=config.tune, cache=cache, repeats=config.tuning_repeats)]
    if config.merge:
        passes.append(MergeLinear())
    if passes:
        gm = run_passes(gm, passes)
    if not plan.applied:  # the lowering put every original layer back
        plan.notes.append("no layer was decomposed: each layer's reason is in its row")
    gm.meta[PLAN_META_KEY] = plan
    propagate_shapes(gm, example_inputs)
    after = annotate_costs(gm)
    validation = None
    if reference is not None:
        validation = validate(reference, gm, *example_inputs, reference_graph=reference)
    compiled = torch.compile(gm) if config.inductor else None
    return CompressionResult(gm, plan, before, after, validation, compiled, config=config)


_F = TypeVar("_F", bound=Callable[..., Any])


def _keeps_global_rng(fn: _F) -> _F:
    """Run ``fn`` on a fork of torch's CPU random state: the modules that the passes build draw
    their (discarded) initial weights from it, and the caller's random stream must not move."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@_keeps_global_rng
def compress(model: nn.Module, *example_inputs: Any, config: Optional[TuckerConfig] = None) -> CompressionResult:
    """Tucker-decompose the conv/linear layers of ``model``; the model itself is not changed.

    ``model`` is an ``nn.Module``, an ``fx.GraphModule`` or a ``torch.export.ExportedProgram``
    (then the example inputs may be left out for ``ep.example_inputs``, and ``result.exported`` is
    the compressed program, re-exported with the program's dynamic dimensions).

    Example:
        >>> import torch, torch.nn as nn, tucker_fx
        >>> net = nn.Sequential(nn.Conv3d(16, 32, 3), nn.ReLU(), nn.Conv3d(32, 32, 3)).eval()
        >>> r = tucker_fx.compress(net, torch.randn(1, 16, 8, 8, 8), config=tucker_fx.TuckerConfig(rank=0.25))
        >>> r.plan["2"].kind, r.plan["2"].ranks
        ('tucker2', (8, 8))
    """
    if isinstance(model, torch.export.ExportedProgram):
        module, inputs = _unpack_exported("compress", model, example_inputs)
        result = compress(module, *inputs, config=config)
        _reexport(result, model, inputs)
        return result
    _check_inputs("compress", model, example_inputs)
    config = config if config is not None else TuckerConfig()
    if not isinstance(config, TuckerConfig):
        raise TypeError(f"config must be a TuckerConfig, got {type(config).__name__}")
    if config.validate:
        check_runnable_inputs("compress", example_inputs)
    progress = Progress(config.progress)
    gm, before = _analysed_copy(model, example_inputs)
    gm, reference = _prepare(gm, example_inputs, config)
    plan = build_plan(gm, config, progress)
    result = _finish(model, gm, reference, plan, before, example_inputs, config, progress)
    result.source = model_signature(model, example_inputs)
    return result


@_keeps_global_rng
def apply_plan(model: nn.Module, plan: Plan, *example_inputs: Any,
               config: Optional[TuckerConfig] = None) -> CompressionResult:
    """Rebuild the compressed structure of ``plan`` (edited, or loaded with ``Plan.load``) on ``model``.

    The plan's kinds and ranks are used as they are; its cost columns are recomputed.
    """
    if isinstance(model, torch.export.ExportedProgram):
        module, inputs = _unpack_exported("apply_plan", model, example_inputs)
        result = apply_plan(module, plan, *inputs, config=config)
        _reexport(result, model, inputs)
        return result
    _check_inputs("apply_plan", model, example_inputs)
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_plan expects a tucker_fx.Plan, got {type(plan).__name__}")
    config = config if config is not None else TuckerConfig()
    if not isinstance(config, TuckerConfig):
        raise TypeError(f"config must be a TuckerConfig, got {type(config).__name__}")
    if config.validate:
        check_runnable_inputs("apply_plan", example_inputs)
    progress = Progress(config.progress)
    gm, before = _analysed_copy(model, example_inputs)
    gm, reference = _prepare(gm, example_inputs, config)
    from tucker_fx.planning.planner import candidate_sites, check_plan_entry

    sites = {s.display_name: s for s in candidate_sites(gm)}
    # layers the plan does not mention stay as they are
    overrides: dict[str, Any] = {name: None for name in sites}
    for entry in plan:
        if entry.name in sites:
            check_plan_entry(entry, sites[entry.name])
        if entry.kind not in KINDS:
            raise ValueError(f"plan entry {entry.name!r}: kind {entry.kind!r}, expected one of {KINDS}")
        if entry.kind == "none":
            overrides[entry.name] = None
        elif entry.kind == "tucker2":
            if entry.ranks is None or len(entry.ranks) != 2:
                raise ValueError(f"plan entry {entry.name!r}: tucker2 needs ranks (R_s, R_t), got {entry.ranks!r}")
            overrides[entry.name] = (int(entry.ranks[0]), int(entry.ranks[1]))
        else:
            if entry.ranks is None or len(entry.ranks) != 1:
                raise ValueError(f"plan entry {entry.name!r}: {entry.kind} needs one rank, got {entry.ranks!r}")
            overrides[entry.name] = int(entry.ranks[0])
    try:
        replanned = build_plan(gm, config.replace(ranks=overrides, only_if_cheaper=False), progress)
    except DecompositionError:
        raise
    except ValueError as exc:  # the checks are phrased for TuckerConfig.ranks: say where the ranks came from
        raise ValueError(f"the plan does not fit this model: {exc}") from exc
    known = {e.name for e in plan}
    for new in replanned:
        if new.name not in known:
            new.reason = "not in the plan"
        else:
            old = plan[new.name]
            if old.kind == "none" and old.reason:
                new.reason = old.reason
            new.lowering = old.lowering if old.lowering != "original" else None
            new.timings_ms = dict(old.timings_ms)
    result = _finish(model, gm, reference, replanned, before, example_inputs, config, progress)
    result.source = model_signature(model, example_inputs)
    return result


@_keeps_global_rng
def lower(model: nn.Module, *example_inputs: Any, tune: bool = True,
          tuning_cache: "bool | str" = True, fold_bn: bool = True, merge: bool = True) -> fx.GraphModule:
    """The same lowering passes as ``compress``, without decomposition: the fair baseline.

    BatchNorm folding, each conv's fastest variant (direct, channels_last, FFT; chosen by
    measurement or by the cost model), max-pooling moved before monotone activations, and the
    merge of adjacent linear maps. The choices are in
    ``gm.meta["tucker_fx.lowering"]``.

    Example:
        >>> import torch, torch.nn as nn, tucker_fx
        >>> net = nn.Sequential(nn.Conv2d(2, 2, 9, padding=4)).eval()
        >>> gm = tucker_fx.lower(net, torch.randn(1, 2, 64, 64), tuning_cache=False)
        >>> sorted(gm.meta["tucker_fx.lowering"]["0"])
        ['lowering', 'source', 'timings_ms']
    """
    if isinstance(model, torch.export.ExportedProgram):
        model, example_inputs = _unpack_exported("lower", model, example_inputs)
    _check_inputs("lower", model, example_inputs)
    config = TuckerConfig(tune=tune, tuning_cache=tuning_cache, fold_bn=fold_bn, merge=merge, validate=False)
    gm, _ = _analysed_copy(model, example_inputs)
    gm, _ = _prepare(gm, example_inputs, config)
    cache = _cache(config) if tune else None
    lowering = LowerConvs(tune=tune, cache=cache, repeats=config.tuning_repeats)
    pools = LowerMaxPools(tune=tune, cache=cache, repeats=config.tuning_repeats)
    gm = run_passes(gm, [lowering, PoolBeforeActivation(), pools] + ([MergeLinear()] if merge else []))
    gm.meta["tucker_fx.lowering"] = lowering.choices
    return gm
