"""Data-aware factors fitted layer by layer, each to the inputs the compressed layers before it produce.

With ``TuckerConfig(data_aware=True)``, :func:`fit_sequentially` walks the planned layers in graph
order. For each one it

1. collects the layer's channel statistics on the calibration data with the layers before it
   already replaced by their blocks (``collect_stats(..., swaps=...)``), so the factors fit what the
   layer will see in the compressed network, and the bias absorbs the mean drift of the layers
   before (``b + W m_ref - W_hat m``, :func:`~tucker_fx.passes.blocks.corrected_bias`);
2. builds both the weight-only and the data-aware block and keeps the one whose network output error
   (``||f(x) - f_k(x)||^2 / ||f(x)||^2``, the layers before and this one approximated) on the first
   calibration batches is lower. Fitting a layer to its responses minimises that layer's error, not
   the network's: on the trained THETIS net the response PCA lowered the network's output error for
   C1 and L2 but raised it for C2 at the same ranks. The plan records the choice
   (``LayerPlan.factors``) and both errors in the layer's notes;
3. puts the chosen block in place for the layers after it.

``apply_plan`` runs the same walk without step 2 (the plan's ``factors`` are kept), so re-applying a
plan with the same calibration data rebuilds the same blocks.

Example:
    >>> import torch, torch.nn as nn, tucker_fx
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    >>> x = torch.randn(8, 16)
    >>> r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=4, only_if_cheaper=False, data_aware=True,
    ...                        speed_check=False, progress=False), calibration=[torch.randn(32, 16)])
    >>> r.plan["0"].factors in ("weights", "data")
    True
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from tucker_fx._internal.meta import SITE_KEY, STATS_KEY
from tucker_fx._internal.progress import Progress
from tucker_fx.analysis.calibration import collect_stats
from tucker_fx.config import TuckerConfig
from tucker_fx.planning.plan import LayerPlan, Plan
from tucker_fx.search.budgeted import _loss, _outputs, _swaps, option_block

__all__ = ["fit_sequentially"]


def _graph_order(gm: fx.GraphModule, plan: Plan) -> list[LayerPlan]:
    """The applied layers of ``plan``, by the position of their first call in ``gm``."""
    first: dict[str, int] = {}
    for i, n in enumerate(gm.graph.nodes):
        site = n.meta.get(SITE_KEY)
        if site is not None:
            first.setdefault(site.display_name, i)
    applied = [e for e in plan.layers if e.applied and e.ranks and e.name in first]
    return sorted(applied, key=lambda e: first[e.name])


def fit_sequentially(gm: fx.GraphModule, plan: Plan, config: TuckerConfig, calibration: list[tuple],
                     scoring: list[tuple], *, choose: bool = True, progress: Optional[Progress] = None) -> None:
    """Re-collect each applied layer's statistics (``node.meta[STATS_KEY]``) on ``gm`` with the layers before
    it replaced by their blocks; with ``choose``, set its ``factors`` to whichever of weight-only and
    data-aware gives the lower network output error on ``scoring`` (see the module docstring)."""
    if not calibration:
        return
    references = []
    if choose and scoring:
        with torch.no_grad():
            references = [_outputs(gm(*b)) for b in scoring]
    nodes = {n.name: n for n in gm.graph.nodes}
    swaps: dict[str, tuple[Any, Optional[tuple[int, ...]]]] = {}
    order = _graph_order(gm, plan)
    for i, entry in enumerate(order):
        node = nodes.get(entry.node)
        ranks = tuple(entry.ranks or ())
        aware_possible = (node is not None and STATS_KEY in node.meta and not entry.as_conv
                          and (choose or entry.factors == "data"))
        if progress is not None:
            progress.step(i + 1, len(order), f"data-aware factors: {entry.name}")
        if aware_possible and swaps:
            collect_stats(gm, calibration, swaps=swaps, layers=[entry.name])
        stats = node.meta.get(STATS_KEY) if aware_possible and node is not None else None
        try:
            if stats is None:
                block = option_block(gm, entry, ranks, None, data_aware=False, hooi_iters=config.hooi_iters,
                                     solver=config.tucker_solver)
            elif not (choose and scoring):
                block = option_block(gm, entry, ranks, stats, data_aware=entry.factors == "data",
                                     hooi_iters=config.hooi_iters, solver=config.tucker_solver)
            else:
                block = _choose(gm, entry, ranks, stats, config, scoring, references, swaps)
        except (ValueError, RuntimeError) as exc:  # a layer the search cannot rebuild stays as it is here
            entry.notes.append(f"factors: the layers after this one were fitted without its block ({exc})")
            continue
        swaps.update(_swaps(gm, entry, block))


def _choose(gm: fx.GraphModule, entry: LayerPlan, ranks: tuple[int, ...], stats: Any, config: TuckerConfig,
            scoring: list[tuple], references: list[Any], swaps: dict[str, Any]) -> Any:
    blocks, errors = {}, {}
    for label, aware in (("weights", False), ("data", True)):
        blocks[label] = option_block(gm, entry, ranks, stats, data_aware=aware, hooi_iters=config.hooi_iters,
                                     solver=config.tucker_solver)
        errors[label] = _loss(gm, scoring, references, {**swaps, **_swaps(gm, entry, blocks[label])})
    # ties (exact at full rank: both ~0) go to the data-aware factors the config asked for
    entry.factors = "data" if errors["data"] <= errors["weights"] + 1e-12 else "weights"
    upstream = "with the layers before it compressed" if swaps else "only this layer compressed"
    entry.notes.append(f"factors: {entry.factors} (network output error on calibration data, {upstream}: "
                       f"data-aware {errors['data']:.3g}, weight-only {errors['weights']:.3g}; "
                       f"{stats.batches} batches)")
    return blocks[entry.factors]
