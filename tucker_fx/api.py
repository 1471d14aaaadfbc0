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
import statistics
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch

import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.meta import CAPTURE_KEY, LOWERING_KEY, NOTES_KEY, PLAN_KEY
from tucker_fx._internal.progress import Progress
from tucker_fx._internal.timing import compare_samples
from tucker_fx.analysis.calibration import as_batches, collect_stats
from tucker_fx.analysis.capture import CAPTURE_PATHS, Captured, _runnable, capture_model, copy_model
from tucker_fx.analysis.costs import CostReport, annotate_costs
from tucker_fx.config import TuckerConfig
from tucker_fx.errors import DecompositionError, PlanEditedWarning, PoorCompressionWarning, SlowerThanOriginalWarning
from tucker_fx.passes.pipeline import DECOMPOSE, LOWER, PREPARE, SHAPES, SITES, pipeline_run
from tucker_fx.passes.runner import PipelineRun
from tucker_fx.planning.plan import KINDS, Plan
from tucker_fx.planning.planner import build_plan
from tucker_fx.search.budgeted import SEARCH_BATCHES, budgeted_plan
from tucker_fx.search.factors import fit_sequentially
from tucker_fx.validation import ValidationReport, check_runnable_inputs, validate

__all__ = ["CompressionResult", "compress", "apply_plan", "lower", "model_signature", "PLAN_META_KEY",
           "CAPTURE_META_KEY", "POOR_SQNR_DB", "POOR_TOP1"]

PLAN_META_KEY = PLAN_KEY  # the keys live in tucker_fx._internal.meta; these names stay for old imports
CAPTURE_META_KEY = CAPTURE_KEY
POOR_SQNR_DB = 6.0
"""Below this SQNR (dB; rel. L2 error above 0.5) the compressed model is reported as poor."""
POOR_TOP1 = 0.5
"""Below this top-1 agreement with the original the compressed model is reported as poor."""


@dataclass
class CompressionResult:
    """``module``: the compressed GraphModule; ``plan``: what was done per layer;
    ``before``/``after``: cost reports; ``validation``: errors against the original (or None);
    ``compiled``: ``torch.compile(module)`` when ``TuckerConfig(inductor=True)``; ``exported``: the
    compressed model re-exported, when ``compress`` was given a ``torch.export.ExportedProgram``;
    ``config``: the config used; ``source``: what the original model looked like
    (:func:`model_signature`), which ``tucker_fx.save`` records; ``capture``: how the model was
    captured (``"symbolic_trace"``, ``"export"``, ``"graph_module"``, ``"exported_program"``; also
    ``plan.capture``).

    ``timing``: with ``TuckerConfig(speed_check=True)`` (the default), the original and the
    compressed model timed side by side at the example inputs (medians in ms, their spread, the
    speed-up; and the compiled module's time with ``inductor=True``), else None.

    ``metric``: with ``compress(..., evaluate=fn)``, ``{"original": fn(model), "compressed":
    fn(module), "drop": ...}``; ``search``: with a ``target_*``, the budgeted search's
    :class:`~tucker_fx.search.SearchReport` (rounds, budget, time).

    ``plan`` is yours to edit and re-apply (``apply_plan(model, result.plan, x)``); the result
    keeps its own copy of the plan ``module`` was built with (:meth:`built_plan`), which
    ``tucker_fx.save`` writes."""

    module: fx.GraphModule
    plan: Plan
    before: CostReport
    after: CostReport
    validation: Optional[ValidationReport]
    compiled: Optional[Callable[..., Any]] = None
    exported: Optional[Any] = None  # a torch.export.ExportedProgram when one was compressed
    config: Optional[TuckerConfig] = None
    source: Optional[dict[str, Any]] = None
    capture: Optional[str] = None
    timing: Optional[dict[str, Any]] = None
    metric: Optional[dict[str, float]] = None
    search: Optional[Any] = None
    _built: Optional[dict[str, Any]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._built is None:
            self.keep_plan()

    def keep_plan(self) -> None:
        """Record ``plan`` as the plan ``module`` was built with (see :meth:`built_plan`)."""
        self._built = self.plan.to_dict()

    def built_plan(self) -> Plan:
        """A copy of the plan ``module`` was built with, whatever edits ``plan`` has had since."""
        return Plan.from_dict(self._built) if self._built is not None else copy.deepcopy(self.plan)

    def plan_edits(self) -> list[str]:
        """How ``plan`` differs from the plan ``module`` was built with (empty if it does not)."""
        built, now = self._built or {}, self.plan.to_dict()
        if built == now:
            return []
        before = {l["name"]: l for l in built.get("layers", [])}
        after = {l["name"]: l for l in now.get("layers", [])}
        edits = [f"layer {n!r} removed" for n in before if n not in after]
        edits += [f"layer {n!r} added" for n in after if n not in before]
        for n in before:
            if n in after and before[n] != after[n]:
                keys = [k for k in before[n] if before[n][k] != after[n].get(k)]
                edits.append(f"layer {n!r}: " + ", ".join(f"{k} {before[n][k]!r} -> {after[n].get(k)!r}" for k in keys))
        for key in ("notes", "capture", "version"):
            if built.get(key) != now.get(key):
                edits.append(f"{key} {built.get(key)!r} -> {now.get(key)!r}")
        return edits

    @property
    def params_ratio(self) -> float:
        """Parameters the model's forward uses, before over after: modules that forward never
        calls (``before.unused_params``) leave the compressed graph, and that is no compression."""
        return self.before.used_params / max(self.after.used_params, 1)

    @property
    def flops_ratio(self) -> float:
        return self.before.total_flops / max(self.after.total_flops, 1)

    def summary(self) -> str:
        lines = [
            self.plan.to_markdown(),
            "",
            f"params {self.before.used_params:,} -> {self.after.used_params:,} (x{self.params_ratio:.2f}); "
            f"FLOPs {self.before.total_flops:,} -> {self.after.total_flops:,} (x{self.flops_ratio:.2f})",
        ]
        if self.before.unused_params:
            lines.append(f"not counted above: {self.before.unused_params:,} parameters of modules that forward "
                         f"does not call ({', '.join(self.before.unused[:5])}{', ...' if len(self.before.unused) > 5 else ''}); "
                         "the compressed module does not hold them")
        if self.validation is not None:
            lines.append(f"validation: {self.validation}")
            poor = _poor(self.validation)
            if poor:
                lines.append(f"WARNING: {poor}")
        if self.timing is not None:
            t = self.timing
            line = (f"time at the example inputs: original {t['original_ms']:.3g} ms, compressed "
                    f"{t['compressed_ms']:.3g} ms (x{t['speedup']:.2f}, realisation {t['speedup'] / self.flops_ratio:.2f} "
                    f"of the FLOPs cut)")
            if "compiled_ms" in t:
                line += f", compiled {t['compiled_ms']:.3g} ms"
            lines.append(line + (" -- the machine was busy: rerun to trust these" if t.get("busy") else ""))
        return "\n".join(lines)


def _poor(validation: ValidationReport) -> Optional[str]:
    """Why the compressed model is of little use (SQNR or top-1 agreement too low), or ``None``."""
    bad = []
    if not math.isnan(validation.sqnr_db) and validation.sqnr_db < POOR_SQNR_DB:
        bad.append(f"SQNR {validation.sqnr_db:.1f} dB (rel. L2 error {validation.rel_error:.3g})")
    if validation.top1_agreement is not None and validation.top1_agreement < POOR_TOP1:
        bad.append(f"top-1 agreement with the original {validation.top1_agreement:.0%}")
    if not bad:
        return None
    return ("the compressed model is far from the original: " + ", ".join(bad) + " on the example inputs. "
            "Try higher ranks (TuckerConfig(rank=0.5), a fraction of each layer's full rank, instead of "
            "EVBMF's, which floors the ranks of lightly trained layers), exclude the layers with the largest "
            "errors, or fine-tune the compressed model (tucker_fx.finetune(result.module, loader, "
            "teacher=model)).")


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


def _analysed_copy(model: nn.Module, example_inputs: tuple, path: str = "auto", check: bool = True,
                   verb: str = "compress") -> tuple[fx.GraphModule, CostReport, Captured]:
    """Capture a copy of ``model`` (``symbolic_trace``, else ``torch.export``; checked against the
    model when ``check``), with shapes and costs annotated."""
    captured = capture_model(model, example_inputs, path=path, check=check, verb=verb)
    captured.gm.meta[CAPTURE_KEY] = captured.path
    return captured.gm, annotate_costs(captured.gm, model=model), captured


def _capture_path(value: Any, verb: str) -> str:
    if value not in ("auto",) + CAPTURE_PATHS:
        raise ValueError(f"{verb}: capture must be 'auto', 'symbolic_trace' or 'export', got {value!r}")
    return str(value)


def _prepare(gm: fx.GraphModule, example_inputs: tuple, config: TuckerConfig,
             run: Optional[PipelineRun] = None) -> tuple[fx.GraphModule, Optional[fx.GraphModule]]:
    """Run :data:`~tucker_fx.passes.pipeline.PREPARE` (BatchNorm folding) and re-analyse what it
    left stale (the planner reads the analysis), then keep a copy for the per-layer errors of
    validation (folded too, so that each layer is compared with what it replaces)."""
    run = run if run is not None else pipeline_run(config, example_inputs)
    gm = run.run(gm, PREPARE)
    run.ensure(gm, SITES)
    reference = copy.deepcopy(gm) if config.validate else None
    return gm, reference


def _graph_notes(gm: fx.GraphModule, captured: Captured, config: TuckerConfig) -> list[str]:
    """Plan notes on the capture and on BatchNorms that were not folded."""
    notes = list(captured.notes)
    if config.fold_bn:
        notes += [n for n in gm.meta.get(NOTES_KEY, []) if "not folded" in n]
    return notes


def _warn_if_poor(validation: Optional[ValidationReport]) -> None:
    poor = _poor(validation) if validation is not None else None
    if poor:
        warnings.warn(poor, PoorCompressionWarning, stacklevel=5)


def _nothing_to_do(model: nn.Module, plan: Plan, example_inputs: tuple, config: TuckerConfig,
                   path: str) -> CompressionResult:
    """No layer to decompose: the model as traced, with no pass applied (no BatchNorm folding,
    lowering or merge either), and a plan that says why."""
    if not plan.layers:
        plan.notes.append("the model has no conv or linear layer (nn.Conv1d/2d/3d, nn.ConvTranspose*, nn.Linear "
                          "or their functional forms): nothing to decompose; the model is returned as traced")
    else:
        plan.notes.append("no layer is to be decomposed (each layer's reason is in its row); the model is "
                          "returned as traced, with no pass applied")
    again = path if path in CAPTURE_PATHS else "auto"
    gm, report, _ = _analysed_copy(model, example_inputs, path=again, check=False)
    gm.meta[PLAN_KEY] = plan
    validation = validate(model, gm, *example_inputs) if config.validate else None
    compiled = torch.compile(gm) if config.inductor else None
    return CompressionResult(gm, plan, report, report, validation, compiled, config=config, capture=plan.capture)


def _finish(model: nn.Module, gm: fx.GraphModule, reference: Optional[fx.GraphModule], plan: Plan,
            before: CostReport, example_inputs: tuple, config: TuckerConfig, progress: Progress) -> CompressionResult:
    if not plan.applied and config.target is None:  # (a target may be met by the lowering alone)
        return _nothing_to_do(model, plan, example_inputs, config, str(plan.capture))
    gm.meta[PLAN_KEY] = plan  # the rewrite and the lowering read it there
    run = pipeline_run(config, example_inputs, progress=progress)
    gm = run.run(gm, DECOMPOSE)
    if not plan.applied:  # the lowering put every original layer back
        plan.notes.append("no layer was decomposed: each layer's reason is in its row")
    gm.train(bool(getattr(model, "training", False)))  # new blocks are built in training mode: follow the model
    run.refresh(gm, SHAPES)  # the cost report of the compressed graph is taken afresh
    after = annotate_costs(gm)
    validation = None
    if reference is not None:  # against the user's model itself: a capture can be wrong
        validation = validate(model, gm, *example_inputs, reference_graph=reference)
        _warn_if_poor(validation)
    compiled = torch.compile(gm) if config.inductor else None
    timing = None
    if config.speed_check and _runnable(example_inputs):
        timing, compiled = _speed_check(model, gm, compiled, example_inputs, plan)
    return CompressionResult(gm, plan, before, after, validation, compiled, config=config, capture=plan.capture,
                             timing=timing)


SPEED_CHECK_REPEATS = 5
"""Interleaved runs of each model in the speed check (medians)."""


def _speed_check(model: nn.Module, gm: fx.GraphModule, compiled: Optional[Callable[..., Any]], inputs: tuple,
                 plan: Plan) -> tuple[dict[str, Any], Optional[Callable[..., Any]]]:
    """Time the original, the compressed module (and the compiled one) side by side; warn when the
    compressed model is slower; keep the compiled module only where it beats the eager one."""
    original = copy_model(model)  # a copy: a model in training mode updates its BatchNorm statistics
    fns: dict[str, Callable[[], Any]] = {"original": lambda: original(*inputs), "compressed": lambda: gm(*inputs)}
    if compiled is not None:
        with torch.no_grad():
            compiled(*inputs)  # compile outside the timing
        fns["compiled"] = lambda: compiled(*inputs)
    samples = compare_samples(fns, repeats=SPEED_CHECK_REPEATS)
    med = {k: statistics.median(v) for k, v in samples.items()}
    busy = [k for k, v in samples.items() if max(v) > 1.5 * min(v)]
    timing: dict[str, Any] = {f"{k}_ms": m for k, m in med.items()}
    timing.update(speedup=med["original"] / med["compressed"], repeats=SPEED_CHECK_REPEATS,
                  spread_ms={k: [min(v), max(v)] for k, v in samples.items()}, busy=bool(busy))
    noisy = (f" (the runs of {', '.join(busy)} spread by over x1.5: the machine was busy, so rerun before "
             "trusting this)") if busy else ""
    if "compiled" in med and med["compiled"] > med["compressed"]:
        plan.notes.append(f"inductor was slower than the eager lowered module ({med['compiled']:.3g} ms vs "
                          f"{med['compressed']:.3g} ms): result.compiled is the eager module")
        compiled = gm
    if med["compressed"] > 1.05 * med["original"]:
        message = (f"the compressed model ran slower than the original at the example inputs: "
                   f"{med['compressed']:.3g} ms vs {med['original']:.3g} ms (medians of {SPEED_CHECK_REPEATS} "
                   f"interleaved runs){noisy}. Try TuckerConfig(tune=True) (lowerings chosen by measurement, and "
                   "layers that do not win put back), lower ranks, or exclude the layers whose blocks are slow")
        plan.notes.append("WARNING: " + message)
        warnings.warn(message, SlowerThanOriginalWarning, stacklevel=4)
    return timing, compiled


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
def compress(model: nn.Module, *example_inputs: Any, config: Optional[TuckerConfig] = None,
             capture: str = "auto", calibration: Optional[Iterable[Any]] = None,
             evaluate: Optional[Callable[[nn.Module], float]] = None) -> CompressionResult:
    """Tucker-decompose the conv/linear layers of ``model``; the model itself is not changed.

    ``model`` is an ``nn.Module``, an ``fx.GraphModule`` or a ``torch.export.ExportedProgram``
    (then the example inputs may be left out for ``ep.example_inputs``, and ``result.exported`` is
    the compressed program, re-exported with the program's dynamic dimensions).

    An ``nn.Module`` is captured with ``torch.fx.symbolic_trace`` (layers named by module), and
    with ``torch.export.export(model, inputs, strict=False)`` when tracing fails, or when the
    traced graph does not compute what the model computes on the example inputs (checked when
    ``config.validate``; a :class:`~tucker_fx.errors.CaptureWarning` then says so).
    ``capture="symbolic_trace"`` or ``"export"`` forces one path. ``result.capture`` and
    ``result.plan.capture`` say which was used. Validation compares with ``model`` itself.

    ``calibration``: an iterable of model inputs (tensors, or tuples of positional inputs; for a
    DataLoader of ``(x, y)`` pass ``(x for x, _ in loader)``), a few hundred samples: the layers'
    statistics for ``TuckerConfig(data_aware=True)`` and the data that scores each option of a
    ``target_*`` search. ``evaluate``: ``fn(module) -> float`` (higher is better), called on the
    original and the compressed model (``result.metric``); with ``TuckerConfig(max_metric_drop=d)``
    and no target, the search picks the largest FLOPs cut whose drop stays within ``d``.

    Example:
        >>> import torch, torch.nn as nn, tucker_fx
        >>> net = nn.Sequential(nn.Conv3d(16, 32, 3), nn.ReLU(), nn.Conv3d(32, 32, 3)).eval()
        >>> r = tucker_fx.compress(net, torch.randn(1, 16, 8, 8, 8), config=tucker_fx.TuckerConfig(rank=0.25))
        >>> r.plan["2"].kind, r.plan["2"].ranks
        ('tucker2', (8, 8))
    """
    if isinstance(model, torch.export.ExportedProgram):
        module, inputs = _unpack_exported("compress", model, example_inputs)
        result = compress(module, *inputs, config=config, calibration=calibration, evaluate=evaluate)
        _reexport(result, model, inputs)
        result.capture = result.plan.capture = "exported_program"
        result.keep_plan()
        return result
    _check_inputs("compress", model, example_inputs)
    config = config if config is not None else TuckerConfig()
    if not isinstance(config, TuckerConfig):
        raise TypeError(f"config must be a TuckerConfig, got {type(config).__name__}")
    if config.validate:
        check_runnable_inputs("compress", example_inputs)
    path = _capture_path(capture, "compress")
    _check_data_args(config, calibration, evaluate)
    if config.target is None and config.max_metric_drop is not None:
        return _within_metric_drop(model, example_inputs, config, path, calibration, evaluate)
    progress = Progress(config.progress)
    gm, before, captured = _analysed_copy(model, example_inputs, path, config.validate, "compress")
    gm, reference = _prepare(gm, example_inputs, config)
    batches: list[tuple] = []
    calibration_batches: list[tuple] = []
    if calibration is not None:
        calibration_batches = list(as_batches(calibration))  # read again, layer by layer, for data-aware factors
        batches = calibration_batches[:SEARCH_BATCHES]
        collect_stats(gm, calibration_batches, progress=progress)
    plan = build_plan(gm, config, progress)
    plan.capture = captured.path
    plan.notes[:0] = _graph_notes(gm, captured, config)
    search = None
    if config.target is not None:
        plan, search = _budget(model, gm, plan, before, example_inputs, config, batches, progress)
    if config.data_aware:
        fit_sequentially(gm, plan, config, calibration_batches, batches, progress=progress)
    result = _finish(model, gm, reference, plan, before, example_inputs, config, progress)
    result.source = model_signature(model, example_inputs)
    result.search = search
    if evaluate is not None:
        _evaluate(result, model, evaluate, config)
    result.keep_plan()
    return result


def _check_data_args(config: TuckerConfig, calibration: Any, evaluate: Any, verb: str = "compress") -> None:
    if config.data_aware and calibration is None:
        raise ValueError(f"{verb}: TuckerConfig(data_aware=True) needs calibration data: expected calibration= an "
                         "iterable of model inputs (tensors or tuples of them), got None")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"{verb}: evaluate: expected a callable module -> float, got {type(evaluate).__name__}")
    if config.max_metric_drop is not None and evaluate is None:
        raise ValueError(f"{verb}: TuckerConfig(max_metric_drop=...) needs evaluate= a callable module -> float "
                         "(higher is better), got None")
    if calibration is not None and isinstance(calibration, torch.Tensor):
        raise TypeError(f"{verb}: calibration: expected an iterable of model inputs (a list of batches, a "
                        "generator), got one tensor; wrap it: calibration=[x]")


def _time_pair(model: nn.Module, inputs: tuple, other: Optional[Callable[..., Any]] = None,
               repeats: int = SPEED_CHECK_REPEATS) -> tuple[float, float]:
    original = copy_model(model)
    fns: dict[str, Callable[[], Any]] = {"original": lambda: original(*inputs)}
    if other is not None:
        fns["other"] = lambda: other(*inputs)
    samples = compare_samples(fns, repeats=repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return med["original"], med.get("other", float("nan"))


def _budget(model: nn.Module, gm: fx.GraphModule, plan: Plan, before: CostReport, example_inputs: tuple,
            config: TuckerConfig, batches: list[tuple], progress: Progress) -> tuple[Plan, Any]:
    """Replace the plan's ranks by the budgeted search's (see :mod:`tucker_fx.search.budgeted`)."""
    speed = config.target is not None and config.target[0] == "target_speedup"
    if speed and not _runnable(example_inputs):
        raise ValueError("compress: TuckerConfig(target_speedup=...) times the model at the example inputs: expected "
                         "real tensors, got meta/fake ones")

    def build(candidate: Plan) -> fx.GraphModule:
        trial = copy.deepcopy(gm)
        trial.meta[PLAN_KEY] = candidate
        return pipeline_run(config, example_inputs).run(trial, DECOMPOSE)

    baseline: dict[str, float] = {}

    def times() -> dict[str, float]:  # the original and the lowered original, timed side by side once
        if not baseline:
            lowered = lower(model, *example_inputs, config=config.replace(validate=False, progress=False,
                                                                          target_speedup=None))
            baseline["original"], baseline["lowered"] = _time_pair(model, example_inputs, lowered)
        return baseline

    plan, search, _ = budgeted_plan(
        gm, plan, config, example_inputs, batches, totals=(before.total_macs, before.used_params),
        original_ms=(lambda: times()["original"]) if speed else None,
        lowered_ms=(lambda: times()["lowered"]) if speed else None,
        build=build if speed else None,
        compressed_ms=(lambda built: _time_pair(model, example_inputs, built)) if speed else None,
        progress=progress)
    return plan, search


def _evaluate(result: CompressionResult, model: nn.Module, evaluate: Callable[[nn.Module], float],
              config: TuckerConfig) -> None:
    with torch.random.fork_rng(devices=[]):
        original = float(evaluate(model))
    with torch.random.fork_rng(devices=[]):
        compressed = float(evaluate(result.module))
    result.metric = {"original": original, "compressed": compressed, "drop": original - compressed}
    result.plan.notes.append(f"metric: original {original:.4g}, compressed {compressed:.4g} "
                             f"(drop {original - compressed:.4g})")
    limit = config.max_metric_drop
    if limit is not None and original - compressed > limit:
        message = (f"the metric fell by {original - compressed:.4g} (original {original:.4g}, compressed "
                   f"{compressed:.4g}), over TuckerConfig.max_metric_drop={limit:g}")
        result.plan.notes.append("WARNING: " + message)
        warnings.warn(message, PoorCompressionWarning, stacklevel=3)


METRIC_SEARCH_RATIOS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
"""FLOPs cuts tried, in order, by ``max_metric_drop`` without a target."""


def _within_metric_drop(model: nn.Module, example_inputs: tuple, config: TuckerConfig, path: str,
                        calibration: Optional[Iterable[Any]], evaluate: Any) -> CompressionResult:
    """The largest FLOPs cut of :data:`METRIC_SEARCH_RATIOS` whose metric drop stays within
    ``config.max_metric_drop`` (each a budgeted ``target_flops_ratio`` compression)."""
    batches = list(as_batches(calibration)) if calibration is not None else None
    best: Optional[CompressionResult] = None
    tried = []
    for ratio in METRIC_SEARCH_RATIOS:
        cfg = config.replace(target_flops_ratio=ratio, max_metric_drop=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PoorCompressionWarning)
            result = compress(model, *example_inputs, config=cfg, capture=path, calibration=batches,
                              evaluate=evaluate)
        assert result.metric is not None
        tried.append(f"x{ratio:g} FLOPs: drop {result.metric['drop']:.4g}")
        if result.metric["drop"] > config.max_metric_drop:  # type: ignore[operator]
            break
        best = result
    if best is None:
        best = result
        message = (f"even a x{METRIC_SEARCH_RATIOS[0]:g} FLOPs cut lowered the metric by {result.metric['drop']:.4g}, "
                   f"over TuckerConfig.max_metric_drop={config.max_metric_drop:g}")
        best.plan.notes.append("WARNING: " + message)
        warnings.warn(message, PoorCompressionWarning, stacklevel=3)
    best.plan.notes.append(f"max_metric_drop={config.max_metric_drop:g}: tried " + "; ".join(tried))
    best.config = config
    best.keep_plan()
    return best


@_keeps_global_rng
def apply_plan(model: nn.Module, plan: Plan, *example_inputs: Any,
               config: Optional[TuckerConfig] = None, capture: str = "auto",
               calibration: Optional[Iterable[Any]] = None) -> CompressionResult:
    """Rebuild the compressed structure of ``plan`` (edited, or loaded with ``Plan.load``) on ``model``.

    The plan's kinds and ranks are used as they are; its cost columns are recomputed. The model
    is captured as ``plan.capture`` says (layer names depend on it), else as ``compress`` does;
    ``capture="symbolic_trace"`` or ``"export"`` overrides that. With ``TuckerConfig(data_aware=True)``
    the factors are fitted to ``calibration`` (as in :func:`compress`); a ``target_*`` of ``config``
    is ignored (the plan's ranks are the answer to it).
    """
    if isinstance(model, torch.export.ExportedProgram):
        module, inputs = _unpack_exported("apply_plan", model, example_inputs)
        result = apply_plan(module, plan, *inputs, config=config, calibration=calibration)
        _reexport(result, model, inputs)
        result.capture = result.plan.capture = "exported_program"
        result.keep_plan()
        return result
    _check_inputs("apply_plan", model, example_inputs)
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_plan expects a tucker_fx.Plan, got {type(plan).__name__}")
    config = config if config is not None else TuckerConfig()
    if not isinstance(config, TuckerConfig):
        raise TypeError(f"config must be a TuckerConfig, got {type(config).__name__}")
    if config.validate:
        check_runnable_inputs("apply_plan", example_inputs)
    path = _capture_path(capture, "apply_plan")
    config = config.replace(target_speedup=None, target_flops_ratio=None, target_params_ratio=None,
                            max_metric_drop=None)
    _check_data_args(config, calibration, None, "apply_plan")
    if path == "auto" and plan.capture in CAPTURE_PATHS:
        path = str(plan.capture)
    progress = Progress(config.progress)
    gm, before, captured = _analysed_copy(model, example_inputs, path, config.validate, "apply_plan")
    gm, reference = _prepare(gm, example_inputs, config)
    calibration_batches = list(as_batches(calibration)) if calibration is not None else []
    if calibration is not None:
        collect_stats(gm, calibration_batches, progress=progress)
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
            new.predicted_loss, new.budget_cost = old.predicted_loss, old.budget_cost
            new.factors = old.factors if config.data_aware else "weights"
            if old.rank_source == "budget" and new.applied:
                new.rank_source = "budget"
    replanned.capture = captured.path
    replanned.notes[:0] = _graph_notes(gm, captured, config)
    if config.data_aware:
        fit_sequentially(gm, replanned, config, calibration_batches, [], choose=False, progress=progress)
    result = _finish(model, gm, reference, replanned, before, example_inputs, config, progress)
    result.source = model_signature(model, example_inputs)
    result.keep_plan()
    return result


_LOWER_KEYWORDS = ("tune", "tuning_cache", "fold_bn", "merge")


def _lower_config(config: Optional[TuckerConfig], deprecated: dict[str, Any]) -> TuckerConfig:
    """``config`` (default ``TuckerConfig()``) with the deprecated keywords of ``lower`` applied."""
    config = config if config is not None else TuckerConfig()
    if not isinstance(config, TuckerConfig):
        raise TypeError(f"config must be a TuckerConfig, got {type(config).__name__}")
    unknown = sorted(set(deprecated) - set(_LOWER_KEYWORDS))
    if unknown:
        raise TypeError(f"lower() got an unexpected keyword argument {unknown[0]!r}; expected "
                        f"config=TuckerConfig(...), capture=, or one of the deprecated {_LOWER_KEYWORDS}")
    if deprecated:
        spelled = ", ".join(f"{k}={v!r}" for k, v in deprecated.items())
        warnings.warn(f"lower(..., {spelled}) is deprecated; pass config=TuckerConfig({spelled}) instead "
                      "(note: lower's default is now tune=False, as TuckerConfig's; it was tune=True)",
                      DeprecationWarning, stacklevel=4)
        config = config.replace(**deprecated)
    return config


@_keeps_global_rng
def lower(model: nn.Module, *example_inputs: Any, config: Optional[TuckerConfig] = None,
          capture: str = "auto", **deprecated: Any) -> fx.GraphModule:
    """The same lowering passes as ``compress``, without decomposition: the fair baseline.

    Runs :data:`~tucker_fx.passes.pipeline.LOWER`: BatchNorm folding (``config.fold_bn``), each
    conv's fastest variant (direct, channels_last, FFT), max-pooling moved before monotone
    activations and tiling max pools as ``WindowMax`` (these three with ``config.lowering="auto"``),
    and the merge of adjacent linear maps (``config.merge``). Variants are chosen by the cost model,
    or by measurement with ``TuckerConfig(tune=True)`` (the default is ``tune=False``, as for
    ``compress``, so that the baseline and the compressed model are lowered alike; before this
    release ``lower`` measured by default). ``config.validate`` does not apply: nothing of the
    model runs. The choices are in ``gm.meta["tucker_fx.lowering"]``; how the model was captured
    (as in ``compress``, but the trace is not run against the model) in
    ``gm.meta["tucker_fx.capture"]``.

    The keyword arguments ``tune``, ``tuning_cache``, ``fold_bn`` and ``merge`` of earlier
    versions still work, with a ``DeprecationWarning``: they are applied to ``config``.

    Example:
        >>> import torch, torch.nn as nn, tucker_fx
        >>> net = nn.Sequential(nn.Conv2d(2, 2, 9, padding=4)).eval()
        >>> gm = tucker_fx.lower(net, torch.randn(1, 2, 64, 64), config=tucker_fx.TuckerConfig(tuning_cache=False))
        >>> sorted(gm.meta["tucker_fx.lowering"]["0"])
        ['lowering', 'source', 'timings_ms']
    """
    if isinstance(model, torch.export.ExportedProgram):
        model, example_inputs = _unpack_exported("lower", model, example_inputs)
    _check_inputs("lower", model, example_inputs)
    path = _capture_path(capture, "lower")
    config = _lower_config(config, deprecated)
    # not checked against the model (lower runs nothing of it); a trace that fails is still exported
    gm, _, captured = _analysed_copy(model, example_inputs, path, False, "lower")
    gm = pipeline_run(config, example_inputs).run(gm, LOWER)
    gm.meta.setdefault(LOWERING_KEY, {})  # empty when config.lowering="none"
    gm.meta[CAPTURE_KEY] = captured.path
    return gm
