"""Calibration statistics: what each conv/linear layer sees on the user's data.

``collect_stats`` runs an analysed graph over calibration batches and, at every conv/linear site,
accumulates channel means and second moments without keeping any activation: ``E[x]``, ``E[x x^T]``
of the layer's input channels and ``E[y]``, ``E[y y^T]`` of its pre-bias output channels (``y = W * x``). They are
stored as :class:`LayerStats` on the site nodes (``node.meta[STATS_KEY]``), where the rewrite reads
them to compute data-aware factors (:mod:`tucker_fx.decomposition.data_aware`) and the budgeted
search reads them to predict each layer's loss.

``collect_stats`` alone gives the statistics of the *uncompressed* network (one pass over the data).
Given ``swaps`` (node name -> the block that replaces it) and ``layers``, it collects the named layers'
statistics on the *partly compressed* network instead, stopping each batch once those layers have run:
:func:`tucker_fx.search.factors.fit_sequentially` does this layer by layer, so that each layer's factors
fit the inputs it will see once the layers before it are compressed. Such statistics keep the input
mean of the uncompressed network as ``reference_in_mean``, whose difference the bias then absorbs.

Large feature maps are subsampled: at most ``max_positions`` positions per batch and layer (every
k-th position, deterministic), which keeps a 3-d network's pass in seconds; the moments are
averages, so this changes their noise, not their meaning.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis import annotate_costs
    >>> from tucker_fx.analysis.shapes import propagate_shapes
    >>> from tucker_fx.analysis.calibration import collect_stats, layer_stats
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> x = torch.randn(2, 3, 10, 10)
    >>> propagate_shapes(gm, (x,)); _ = annotate_costs(gm)
    >>> collect_stats(gm, [x, torch.randn(1, 3, 10, 10)])
    2
    >>> s = layer_stats(gm)["2"]
    >>> tuple(s.in_cov.shape), tuple(s.out_cov.shape), s.batches
    ((8, 8), (4, 4), 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.fx as fx

from tucker_fx._internal.meta import SITE_KEY, STATS_KEY
from tucker_fx.decomposition.data_aware import ChannelStats

__all__ = ["LayerStats", "SwappedInterpreter", "Swaps", "collect_stats", "layer_stats", "as_batches"]

Swaps = Mapping[str, tuple[Any, Optional[tuple[int, ...]]]]
"""Node name -> (module that replaces the node's call, feature shape to unflatten its input to, or None)."""


@dataclass
class LayerStats:
    """Channel statistics of one layer on calibration data (float64, on the CPU): the second moments
    ``in_cov = E[x x^T]``, ``out_cov = E[y y^T]`` (``y`` the pre-bias output) and the means."""

    in_cov: torch.Tensor
    out_cov: torch.Tensor
    batches: int
    positions: int
    in_mean: Optional[torch.Tensor] = None
    out_mean: Optional[torch.Tensor] = None
    reference_in_mean: Optional[torch.Tensor] = None
    """The input mean in the uncompressed network, for statistics collected on a partly compressed one
    (``collect_stats(..., swaps=...)``); ``None`` when they are the uncompressed network's."""

    def centred(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The covariances about the means (``in_cov - m m^T``, ``out_cov - mu mu^T``): what the factors
        fit once the mean's share of the error goes into the bias (see ``passes.blocks.build_block``)."""
        def centre(c: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
            if m is None:
                return c
            out = c - torch.outer(m, m)
            return 0.5 * (out + out.mT)
        return centre(self.in_cov, self.in_mean), centre(self.out_cov, self.out_mean)


def as_batches(calibration: Any, where: str = "calibration") -> Iterable[tuple]:
    """Each item of ``calibration`` as a tuple of positional model inputs (a tensor becomes ``(t,)``).

    Raises ``TypeError`` for an item that is neither a tensor nor a tuple/list of them.

    Example:
        >>> import torch
        >>> [len(b) for b in as_batches([torch.zeros(1), (torch.zeros(1), torch.ones(1))])]
        [1, 2]
    """
    if isinstance(calibration, torch.Tensor) or not hasattr(calibration, "__iter__"):
        raise TypeError(f"{where}: expected an iterable of model inputs (tensors, or tuples of positional "
                        f"inputs), got {type(calibration).__name__}; for a DataLoader of (x, y) pass "
                        "(x for x, _ in loader)")
    for i, item in enumerate(calibration):
        if isinstance(item, torch.Tensor):
            yield (item,)
        elif isinstance(item, (tuple, list)) and item and all(isinstance(t, torch.Tensor) for t in item):
            yield tuple(item)
        else:
            raise TypeError(f"{where}: item {i}: expected a tensor or a tuple of tensors (the model's positional "
                            f"inputs), got {type(item).__name__}; for a DataLoader of (x, y) pass "
                            "(x for x, _ in loader)")


def _rows(x: torch.Tensor, dim: int, max_positions: int) -> torch.Tensor:
    """``x`` as a (positions, channels) matrix, channels taken from ``dim``; at most ``max_positions``
    rows (every k-th position)."""
    c = x.shape[dim]
    flat = x.movedim(dim, -1).reshape(-1, c)
    step = -(-flat.shape[0] // max_positions)
    return flat[::step] if step > 1 else flat


class SwappedInterpreter(fx.Interpreter):
    """Runs ``gm`` with some nodes' calls replaced by modules (``swaps``: node name -> (module, feature
    shape)); a Linear "as a conv" gets the feature map its block flattens, reshaped to the feature shape.

    Example:
        >>> import torch, torch.nn as nn, torch.fx as fx
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
        >>> x = torch.randn(2, 3)
        >>> out = SwappedInterpreter(gm, {"_0": (nn.Identity(), None)}).run(x)
        >>> bool(torch.equal(out, x.relu()))
        True
    """

    def __init__(self, gm: fx.GraphModule, swaps: Optional[Swaps] = None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.swaps = dict(swaps or {})

    def run_node(self, n: fx.Node) -> Any:
        swap = self.swaps.get(n.name)
        if swap is None:
            return super().run_node(n)
        block, feature_shape = swap
        x = self.env[n.args[0]]  # type: ignore[index]
        if feature_shape is not None:
            x = x.reshape(x.shape[0], *feature_shape)
        return block(x)


class _Stop(Exception):
    """Raised once the last node whose statistics are wanted has run."""


class _Collector(SwappedInterpreter):
    def __init__(self, gm: fx.GraphModule, stats: dict[str, tuple[ChannelStats, ChannelStats]],
                 max_positions: int, swaps: Optional[Swaps] = None, stop_after: Optional[str] = None) -> None:
        super().__init__(gm, swaps)
        self.stats = stats
        self.max_positions = max_positions
        self.stop_after = stop_after

    def run_node(self, n: fx.Node) -> Any:
        x = self.env.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        out = self._collect(n, x, super().run_node(n))
        if n.name == self.stop_after:
            raise _Stop
        return out

    def _collect(self, n: fx.Node, x: Any, out: Any) -> Any:
        site = n.meta.get(SITE_KEY)
        if site is None or site.display_name not in self.stats or not isinstance(out, torch.Tensor):
            return out
        if not isinstance(x, torch.Tensor) or n.name in self.swaps:
            return out
        in_stats, out_stats = self.stats[site.display_name]
        batched = site.op == "linear" or x.dim() == site.spatial_dims + 2
        dim = -1 if site.op == "linear" else (1 if batched else 0)
        y = out.detach()
        bias = site.bias(self.module)
        if bias is not None:
            shape = [1] * y.dim()
            shape[dim] = -1
            y = y - bias.detach().reshape(shape)
        in_stats.update(_rows(x.detach(), dim, self.max_positions))
        out_stats.update(_rows(y, dim, self.max_positions))
        return out


def collect_stats(gm: fx.GraphModule, calibration: Iterable[Any], *, max_positions: int = 1 << 16,
                  progress: Optional[Any] = None, swaps: Optional[Swaps] = None,
                  layers: Optional[Iterable[str]] = None) -> int:
    """Run ``gm`` (analysed: its conv/linear nodes carry sites) on every calibration batch and store a
    :class:`LayerStats` on each site node; returns the number of batches. A layer called several
    times (a shared module) pools all its calls.

    ``layers`` (plan names) limits the collection to those layers; ``swaps`` runs the graph with those
    nodes replaced (see :class:`SwappedInterpreter`), each batch stopping after the last node collected.
    Statistics that replace the uncompressed network's keep its input mean as ``reference_in_mean``.
    """
    wanted = set(layers) if layers is not None else None
    sites = [n for n in gm.graph.nodes if SITE_KEY in n.meta and not n.meta[SITE_KEY].transposed
             and n.meta[SITE_KEY].groups == 1 and (wanted is None or n.meta[SITE_KEY].display_name in wanted)]
    stats: dict[str, tuple[ChannelStats, ChannelStats]] = {}
    for n in sites:  # accumulated on (positions, channels) rows (see _rows)
        s = n.meta[SITE_KEY]
        stats.setdefault(s.display_name, (ChannelStats(s.in_channels, dim=-1), ChannelStats(s.out_channels, dim=-1)))
    stop_after = sites[-1].name if swaps is not None and sites else None
    collector = _Collector(gm, stats, max_positions, swaps, stop_after)
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    batches = 0
    with torch.no_grad():
        for batch in as_batches(calibration):
            if len(batch) > n_inputs:
                raise TypeError(f"calibration: item {batches}: {len(batch)} tensors for a model of {n_inputs} "
                                f"input(s); for a DataLoader of (x, y) pass (x for x, _ in loader)")
            if progress is not None:
                progress.step(batches + 1, None, "calibration statistics")
            try:
                collector.run(*batch)
            except _Stop:
                pass
            batches += 1
    if batches == 0:
        raise ValueError("calibration: expected at least one batch, got an empty iterable")
    for n in sites:
        ins, outs = stats[n.meta[SITE_KEY].display_name]
        if ins.count == 0:
            continue
        old = n.meta.get(STATS_KEY)
        reference = None
        if swaps is not None and old is not None:
            reference = old.reference_in_mean if old.reference_in_mean is not None else old.in_mean
        n.meta[STATS_KEY] = LayerStats(ins.second_moment().cpu(), outs.second_moment().cpu(), batches, ins.count,
                                       ins.mean().cpu(), outs.mean().cpu(), reference)
    return batches


def layer_stats(gm: fx.GraphModule) -> dict[str, LayerStats]:
    """The :class:`LayerStats` stored on ``gm``'s nodes, by layer name."""
    return {n.meta[SITE_KEY].display_name: n.meta[STATS_KEY] for n in gm.graph.nodes
            if STATS_KEY in n.meta and SITE_KEY in n.meta}
