"""Budgeted compression: per-layer ranks (or "leave it alone") that meet a target with the least loss.

``TuckerConfig(target_speedup=2)`` (or ``target_flops_ratio``, ``target_params_ratio``) asks for a
whole-model ratio, not a rank rule. :func:`budgeted_plan` answers it in four steps:

1. **Options.** Per decomposable layer: ranks at fractions :data:`FRACTIONS` of the layer's full
   ranks (capped by a float ``config.rank``), each cheaper than the layer, plus the layer as it is.
2. **Loss.** For each option, the network's relative output error ``||f(x) - f_k(x)||^2 / ||f(x)||^2``
   with only that layer approximated, summed over the search batches (the first
   :data:`SEARCH_BATCHES` calibration batches, else the example inputs). The approximation is the one
   the rewrite will build: data-aware when ``config.data_aware``.
3. **Cost.** MACs or params from the cost formulas; for a speed target, the median time of the
   option's block (and of the original layer) at the layer's real input shape, lowered as the
   pipeline's cost model lowers it (a block as ``lower_blocks`` picks, the layer left alone as
   ``lower_kept_convs`` picks: FFT for THETIS's 5x11x11 conv) and with the kernels the last pass
   would give it (:class:`~tucker_fx.passes.fast_kernels.UseFastKernels`); the rest of the
   network's time is the model's measured time minus its layers'.
4. **Allocation and check.** :func:`~tucker_fx.planning.budget.allocate` picks one option per layer
   within the budget (Lagrangian + greedy); for a speed target :func:`budgeted_plan` builds the model,
   times it against the original and, if the target is missed (or overshot by over
   :data:`OVERSHOOT`), scales the budget by measured / target and allocates again
   (:data:`MAX_ROUNDS`; the round that meets the target with the least loss is kept). A target that
   is not met gets a :class:`~tucker_fx.errors.TargetNotMetWarning` and a plan note.

The plan records per layer the chosen ranks, ``predicted_loss`` and ``budget_cost`` (and, for a
speed target, ``measured_cost``: the layer's nodes timed in the compressed model); its notes tell
the rounds. Random weights make the losses meaningless: budget a trained model.

Example:
    >>> import torch, torch.nn as nn, tucker_fx
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(8, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
    ...                     nn.Conv2d(32, 32, 3)).eval()
    >>> x = torch.randn(2, 8, 16, 16)
    >>> r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(target_flops_ratio=3.0, progress=False,
    ...                                                               speed_check=False))
    >>> 3.0 <= r.flops_ratio
    True
"""

from __future__ import annotations

import copy
import math
import warnings
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from tucker_fx._internal.meta import ORIGIN_KEY, SITE_KEY, STATS_KEY
from tucker_fx._internal.progress import Progress
from tucker_fx._internal.timing import compare_samples
from tucker_fx.analysis.calibration import SwappedInterpreter, Swaps
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.analysis.sites import Site
from tucker_fx.config import TuckerConfig
from tucker_fx.errors import TargetNotMetWarning
from tucker_fx.passes.blocks import TuckerBlock, build_block, data_aware_inputs
from tucker_fx.passes.fast_kernels import UseFastKernels
from tucker_fx.passes.lowering import block_candidates, conv_candidates, cost_model_block_pick, cost_model_conv_pick
from tucker_fx.passes.tucker_rewrite import original_module
from tucker_fx.planning.budget import Allocation, Option, allocate, budget_for
from tucker_fx.planning.plan import LayerPlan, Plan
from tucker_fx.planning.planner import option_cost, option_kind

__all__ = ["FRACTIONS", "SEARCH_BATCHES", "MAX_ROUNDS", "SearchReport", "budgeted_plan", "candidate_ranks",
           "measure_layer_times", "option_block"]

FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
"""The rank fractions tried per layer."""
SEARCH_BATCHES = 2
"""Calibration batches used to score each option (all batches feed the statistics)."""
MAX_ROUNDS = 3
"""Allocate-build-measure rounds for a speed target."""
SPEED_TOLERANCE = 0.03
"""A speed target counts as met within this fraction below it."""
OVERSHOOT = 0.1
"""A speed-up this far above the target gets another round with a looser budget (less loss)."""
TIMING_REPEATS = 3
"""Timed runs per option (medians, interleaved)."""

_UNITS = {"target_speedup": "ms", "target_flops_ratio": "MACs", "target_params_ratio": "params"}


@dataclass
class SearchReport:
    """What the search did: the target, each round's budget and totals, and its time."""

    target: str
    ratio: float
    unit: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    allocation: Optional[Allocation] = None

    def lines(self) -> list[str]:
        out = [f"budget: {self.target}={self.ratio:g} ({self.unit}); search took {self.seconds:.1f} s"]
        for i, r in enumerate(self.rounds, 1):
            measured = f", measured x{r['measured_ratio']:.2f}" if r.get("measured_ratio") is not None else ""
            out.append(f"budget round {i}: budget {r['budget']:.4g} {self.unit}, predicted total "
                       f"{r['predicted']:.4g} (x{r['predicted_ratio']:.2f}), predicted loss {r['loss']:.3g}{measured}")
        return out


def candidate_ranks(entry: LayerPlan, config: TuckerConfig) -> list[tuple[int, ...]]:
    """The ranks tried for ``entry`` (fractions of its full ranks, capped by a float ``config.rank``).

    Example:
        >>> from tucker_fx.planning.plan import LayerPlan
        >>> e = LayerPlan("c", "c", "conv2d", "tucker2", (4, 4), (16, 32))
        >>> candidate_ranks(e, TuckerConfig(rank=0.25))
        [(1, 2), (2, 4), (3, 6), (4, 8)]
    """
    kind = option_kind(entry)
    if kind is None:
        return []
    limit = config.rank if isinstance(config.rank, float) else 1.0
    fractions = [f for f in FRACTIONS if f <= limit + 1e-12] or [FRACTIONS[0]]
    full = entry.full_ranks
    out: list[tuple[int, ...]] = []
    for f in fractions:
        r = ((max(1, math.ceil(f * full[0])), max(1, math.ceil(f * full[1]))) if kind == "tucker2"
             else (max(1, math.ceil(f * full[1])),))
        if r not in out:
            out.append(r)
    return out


def _conv_args(site: Site) -> Optional[dict[str, Any]]:
    return (dict(stride=site.stride, padding=site.padding, dilation=site.dilation, padding_mode=site.padding_mode)
            if site.op == "conv" else None)


def option_block(gm: fx.GraphModule, entry: LayerPlan, ranks: tuple[int, ...], stats: Any, *,
                 data_aware: bool, hooi_iters: int = 2, solver: str = "gram") -> nn.Module:
    """The block the rewrite would build for ``entry`` at ``ranks`` (data-aware when ``data_aware`` and the
    layer has statistics), from the same :func:`~tucker_fx.passes.blocks.build_block`."""
    node = next(n for n in gm.graph.nodes if n.name == entry.node)
    site: Site = node.meta[SITE_KEY]
    kind = option_kind(entry) or entry.kind
    covs = data_aware_inputs(site.op, kind, stats) if data_aware and stats is not None and not entry.as_conv else {}
    block, _ = build_block(site.weight(gm), site.bias(gm), kind=kind, ranks=ranks, op=site.op,
                           conv_args=_conv_args(site), feature_shape=entry.feature_shape if entry.as_conv else None,
                           hooi_iters=hooi_iters, solver=solver, **covs)
    return block


def _swaps(gm: fx.GraphModule, entry: LayerPlan, block: nn.Module) -> dict[str, tuple[Any, Optional[tuple[int, ...]]]]:
    """Every call of ``entry``'s layer (a shared module is called several times) -> ``block``."""
    shape = tuple(entry.feature_shape) if entry.as_conv and entry.feature_shape else None
    return {n.name: (block, shape) for n in gm.graph.nodes
            if SITE_KEY in n.meta and n.meta[SITE_KEY].display_name == entry.name}


def _outputs(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _loss(gm: fx.GraphModule, batches: list[tuple], references: list[list[torch.Tensor]], swaps: Swaps) -> float:
    num = den = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, references):
            out = _outputs(SwappedInterpreter(gm, swaps).run(*batch))
            for a, b in zip(out, ref):
                num += float((a.double() - b.double()).pow(2).sum())
                den += float(b.double().pow(2).sum())
    return num / max(den, 1e-30)


def _fast(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """``module`` with the kernels the last pass would give it, at input ``x``."""
    gm = fx.symbolic_trace(module)
    propagate_shapes(gm, (x,))
    UseFastKernels()(gm)
    return gm


def _layer_input(gm: fx.GraphModule, entry: LayerPlan, site: Site) -> Optional[torch.Tensor]:
    node = next((n for n in gm.graph.nodes if n.name == (entry.input_node if entry.as_conv else entry.node)), None)
    src = node if entry.as_conv else (site.node.args[0] if isinstance(site.node.args[0], fx.Node) else None)
    meta = src.meta.get("tensor_meta") if src is not None else None
    if meta is None or not hasattr(meta, "shape"):
        return None
    w = site.weight(gm)
    return torch.randn(tuple(meta.shape), dtype=meta.dtype, device=w.device)


def _as_lowered(module: nn.Module, x: torch.Tensor, config: TuckerConfig) -> nn.Module:
    """``module`` (a Tucker block, or a layer left alone) as the pipeline's cost-model lowering would run it
    at input ``x``: a block as :class:`~tucker_fx.passes.lowering.LowerBlocks` picks, a plain conv as
    ``lower_kept_convs`` picks (FFT for THETIS's 5x11x11 conv: 105 ms direct, 14 ms as FFT); as it is
    with ``lowering="none"``, where neither stage runs."""
    if config.lowering != "auto":
        return module
    with torch.no_grad():
        out_shape = tuple(module(x).shape)
    if isinstance(module, TuckerBlock):
        winner, _ = cost_model_block_pick(module, tuple(x.shape), out_shape)
        return block_candidates(module, None).get(winner, module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1:
        winner, _ = cost_model_conv_pick(module, tuple(x.shape), out_shape)
        return conv_candidates(module).get(winner, module)
    return module


def measure_layer_times(gm: fx.GraphModule, entry: LayerPlan, config: TuckerConfig,
                        ranks_list: list[tuple[int, ...]]) -> dict[Optional[tuple[int, ...]], float]:
    """Median ms of the original layer (key ``None``) and of its block at each ranks, at the layer's
    input shape, each lowered as the pipeline would (cost model) and with the fast kernels of the last pass."""
    node = next(n for n in gm.graph.nodes if n.name == entry.node)
    site: Site = node.meta[SITE_KEY]
    x = _layer_input(gm, entry, site)
    if x is None:
        return {}
    original = copy.deepcopy(original_module(gm, site))
    if entry.as_conv:
        original = nn.Sequential(nn.Flatten(1), original)
    else:
        original = _as_lowered(original, x, config)
    fns: dict[Optional[tuple[int, ...]], Callable[[], Any]] = {}
    mods = {None: _fast(nn.Sequential(original), x)}  # traced as a module call, so the pass sees the conv
    for ranks in ranks_list:
        block = option_block(gm, entry, ranks, None, data_aware=False, hooi_iters=0)
        mods[ranks] = _fast(nn.Sequential(_as_lowered(block, x, config)), x)
    for key, mod in mods.items():
        fns[key] = (lambda m: (lambda: m(x)))(mod)
    samples = compare_samples({str(k): f for k, f in fns.items()}, repeats=TIMING_REPEATS)
    return {k: statistics.median(samples[str(k)]) for k in fns}


def _node_times(gm: fx.GraphModule, inputs: tuple, repeats: int = 3) -> dict[str, float]:
    """Median ms per node of ``gm`` on ``inputs`` (an interpreter run; attributes time to the original
    node names through ``ORIGIN_KEY``)."""
    runs: list[dict[str, float]] = []

    class _Timed(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            start = time.perf_counter()
            out = super().run_node(n)
            key = n.meta.get(ORIGIN_KEY, n.name)
            runs[-1][key] = runs[-1].get(key, 0.0) + (time.perf_counter() - start) * 1e3
            return out

    with torch.no_grad():
        for _ in range(repeats + 1):
            runs.append({})
            _Timed(gm).run(*inputs)
    keys = set().union(*runs[1:])
    return {k: statistics.median(r.get(k, 0.0) for r in runs[1:]) for k in keys}


def budgeted_plan(gm: fx.GraphModule, plan: Plan, config: TuckerConfig, example_inputs: tuple,
                  batches: list[tuple], *, totals: tuple[float, float] = (0.0, 0.0),
                  original_ms: Optional[Callable[[], float]] = None,
                  lowered_ms: Optional[Callable[[], float]] = None,
                  build: Optional[Callable[[Plan], fx.GraphModule]] = None,
                  compressed_ms: Optional[Callable[[fx.GraphModule], tuple[float, float]]] = None,
                  progress: Optional[Progress] = None) -> tuple[Plan, SearchReport, Optional[fx.GraphModule]]:
    """Choose every layer's ranks in ``plan`` (built by ``build_plan`` on the analysed ``gm``) for
    ``config``'s target; see the module docstring. ``batches`` score the options (the example
    inputs when empty); ``totals`` are the whole model's MACs and used params before compression (the
    ratios count the whole model). For a speed target ``build`` makes the compressed module from a plan and
    ``compressed_ms`` times it against the original (``(original ms, compressed ms)``); the last
    built module is returned so that the caller need not build it again."""
    target = config.target
    if target is None:
        raise ValueError("budgeted_plan: expected a TuckerConfig with a target_*, got none")
    name, ratio = target
    start = time.perf_counter()
    report = SearchReport(name, ratio, _UNITS[name])
    batches = batches or [example_inputs]
    with torch.no_grad():
        references = [_outputs(gm(*b)) for b in batches]
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = [e for e in plan.layers if option_kind(e) is not None]
    options: dict[str, list[Option]] = {}
    cost_of: dict[str, dict[Optional[tuple[int, ...]], float]] = {}
    for i, entry in enumerate(layers):
        if progress is not None:
            progress.step(i + 1, len(layers), f"budget: scoring {entry.name}")
        node = nodes[entry.node]
        stats = node.meta.get(STATS_KEY)
        kind = option_kind(entry)
        assert kind is not None
        ranks_list = []
        for ranks in candidate_ranks(entry, config):
            macs, params = option_cost(gm, entry, config, ranks)
            if macs < entry.macs_before and params < entry.params_before:
                ranks_list.append((ranks, macs, params))
        if name == "target_speedup":
            times = measure_layer_times(gm, entry, config, [r for r, _, _ in ranks_list])
            if not times:
                continue
            costs: dict[Optional[tuple[int, ...]], float] = dict(times)
        else:
            pick = 1 if name == "target_flops_ratio" else 2
            costs = {None: float(entry.macs_before if pick == 1 else entry.params_before)}
            costs.update({r: float(m if pick == 1 else p) for r, m, p in ranks_list})
        cost_of[entry.name] = costs
        opts = [Option(entry.name, None, costs[None], 0.0, "original")]
        for ranks, _, _ in ranks_list:
            block = option_block(gm, entry, ranks, stats, data_aware=config.data_aware, hooi_iters=config.hooi_iters,
                                 solver=config.tucker_solver)
            swaps = _swaps(gm, entry, block)
            opts.append(Option(entry.name, ranks, costs[ranks], _loss(gm, batches, references, swaps), kind))
        options[entry.name] = opts
    if not options:
        plan.notes.append(f"budget: no layer can be decomposed, so {name}={ratio:g} cannot be met")
        report.seconds = time.perf_counter() - start
        return plan, report, None
    chosen_layers = set(options)
    if name == "target_speedup":
        assert original_ms is not None
        total_before = original_ms()
        # the compressed model is the lowered one with some layers replaced: the rest of its time is the
        # lowered model's minus its layers' (each timed with the kernels the lowered model gives it)
        rest_from = lowered_ms() if lowered_ms is not None else total_before
    else:
        total_before = rest_from = float(totals[0] if name == "target_flops_ratio" else totals[1])
    fixed = max(0.0, rest_from - sum(cost_of[n][None] for n in chosen_layers))
    budget = budget_for(ratio, total_before)
    built: Optional[fx.GraphModule] = None
    best: Optional[tuple[bool, float, Allocation, Optional[fx.GraphModule], Plan]] = None
    met = True
    for round_no in range(MAX_ROUNDS if name == "target_speedup" else 1):
        alloc = allocate(options, budget, fixed_cost=fixed)
        trial = Plan.from_dict(plan.to_dict())
        _apply(trial, alloc, gm, config, cost_of)
        row: dict[str, Any] = {"budget": budget, "predicted": alloc.total_cost, "loss": alloc.total_loss,
                               "predicted_ratio": total_before / max(alloc.total_cost, 1e-30),
                               "feasible": alloc.feasible}
        report.rounds.append(row)
        if name != "target_speedup" or build is None or compressed_ms is None:
            best = (alloc.feasible, 0.0, alloc, None, trial)
            met = alloc.feasible
            break
        if progress is not None:
            progress.step(round_no + 1, MAX_ROUNDS, "budget: building and timing the allocation")
        built = build(Plan.from_dict(trial.to_dict()))
        before_ms, after_ms = compressed_ms(built)
        measured = before_ms / after_ms
        row["measured_ratio"] = measured
        ok = measured >= ratio * (1 - SPEED_TOLERANCE)
        # best: a round that meets the target with the least loss, else the fastest round
        if (best is None or (ok and not best[0]) or (ok and alloc.total_loss < best[2].total_loss)
                or (not ok and not best[0] and measured > best[1])):
            best = (ok, measured, alloc, built, trial)
        if ok and (measured <= ratio * (1 + OVERSHOOT) or alloc.total_loss == 0.0):
            break  # met (a looser budget cannot lower a loss of zero)
        # scale the budget by how far the measurement is from the target (shrink when short, loosen when
        # well over: less loss for the same goal)
        budget *= max(0.5, min(2.0, measured / ratio)) * (1 - SPEED_TOLERANCE if not ok else 1.0)
    assert best is not None
    met, _, alloc, built, trial = best
    report.allocation = alloc
    report.seconds = time.perf_counter() - start
    trial.notes.extend(report.lines())
    if not met:
        last = report.rounds[-1]
        got = (f"measured x{best[1]:.2f} at best" if name == "target_speedup"
               else f"the cheapest allocation gives x{last['predicted_ratio']:.2f}")
        message = (f"{name}={ratio:g} was not met: {got}; the result is the closest found. Layers that cannot be "
                   "decomposed (and, for speed, the time outside conv/linear layers) bound what a rank choice can "
                   "reach")
        trial.notes.append("WARNING: " + message)
        warnings.warn(message, TargetNotMetWarning, stacklevel=4)
    if name == "target_speedup" and built is not None:
        per_node = _node_times(built, example_inputs)
        for entry in trial.layers:
            if entry.name in chosen_layers:
                entry.measured_cost = per_node.get(entry.node)
    return trial, report, built


def _apply(plan: Plan, alloc: Allocation, gm: fx.GraphModule, config: TuckerConfig,
           cost_of: dict[str, dict[Optional[tuple[int, ...]], float]]) -> None:
    """Write the allocation into ``plan``'s entries."""
    for entry in plan.layers:
        opt = alloc.choice.get(entry.name)
        if opt is None:
            continue
        entry.predicted_loss = opt.loss
        entry.budget_cost = opt.cost
        entry.notes = [n for n in entry.notes if not n.startswith("EVBMF gave rank")]  # ranks are the budget's
        if opt.ranks is None:
            if entry.applied:
                entry.reason = "budget: left alone (no decomposition paid for its predicted loss)"
            entry.kind, entry.ranks, entry.rank_source = "none", None, "budget"
            entry.macs_after, entry.params_after = entry.macs_before, entry.params_before
            continue
        entry.kind = option_kind(entry) or entry.kind
        entry.ranks = opt.ranks
        entry.rank_source = "budget"
        entry.reason = None
        entry.macs_after, entry.params_after = option_cost(gm, entry, config, opt.ranks)
