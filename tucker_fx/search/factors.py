"""Data-aware or weight-only factors, per layer, by what the calibration data says.

Fitting a layer's factors to its responses (``TuckerConfig(data_aware=True)``) minimises that layer's
output error on the calibration data, not the network's: on the trained THETIS net the response PCA
lowered the network's output error for C1 (0.45 -> 0.29) and L2 (0.11 -> 0.014) but raised it for C2
(0.14 -> 0.33) at the same ranks. So :func:`choose_factors` builds both approximations of every planned
layer and keeps, per layer, the one with the lower network output error on the first calibration
batches (``||f(x) - f_k(x)||^2 / ||f(x)||^2``, only that layer approximated). The plan records the
choice (``LayerPlan.factors``) and both errors in the layer's notes.

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

from typing import Optional

import torch
import torch.fx as fx

from tucker_fx._internal.meta import STATS_KEY
from tucker_fx._internal.progress import Progress
from tucker_fx.config import TuckerConfig
from tucker_fx.planning.plan import Plan
from tucker_fx.search.budgeted import _loss, _outputs, _swaps, option_block

__all__ = ["choose_factors"]


def choose_factors(gm: fx.GraphModule, plan: Plan, config: TuckerConfig, batches: list[tuple],
                   progress: Optional[Progress] = None) -> None:
    """Set ``factors`` of every applied layer of ``plan`` that has calibration statistics to whichever of
    weight-only and data-aware factors gives the lower network output error on ``batches``."""
    if not batches:
        return
    with torch.no_grad():
        references = [_outputs(gm(*b)) for b in batches]
    nodes = {n.name: n for n in gm.graph.nodes}
    applied = [e for e in plan.layers if e.applied and not e.as_conv and e.ranks]
    for i, entry in enumerate(applied):
        node = nodes.get(entry.node)
        stats = node.meta.get(STATS_KEY) if node is not None else None
        if stats is None:
            continue
        if progress is not None:
            progress.step(i + 1, len(applied), f"factors: weights vs data for {entry.name}")
        ranks = tuple(entry.ranks or ())
        errors = {}
        for label, aware in (("weights", False), ("data", True)):
            block = option_block(gm, entry, ranks, stats, data_aware=aware, hooi_iters=config.hooi_iters,
                                 solver=config.tucker_solver)
            errors[label] = _loss(gm, batches, references, _swaps(gm, entry, block))
        # ties (exact at full rank: both ~0) go to the data-aware factors the config asked for
        entry.factors = "data" if errors["data"] <= errors["weights"] + 1e-12 else "weights"
        entry.notes.append(f"factors: {entry.factors} (network output error on calibration data: data-aware "
                           f"{errors['data']:.3g}, weight-only {errors['weights']:.3g}; {stats.batches} batches)")
