"""Every key the package writes into ``node.meta`` and ``gm.meta``, in one place.

Analysis writes typed records under these keys; later passes, planning and validation only
read them (as FX's ShapeProp writes ``tensor_meta``). Use the constants, never the strings:

- ``tucker_fx.cost`` (node.meta): the node's :class:`~tucker_fx.analysis.NodeCost`; written by
  ``annotate_costs``.
- ``tucker_fx.site`` (node.meta): the :class:`~tucker_fx.analysis.Site` of a conv/linear node;
  written by ``annotate_costs``.
- ``tucker_fx.origin`` (node.meta): the name of the node a Tucker block's node replaced; written
  by the rewrite and by block lowering.
- ``tucker_fx.notes`` (gm.meta): ``list[str]``, one line per decision of the BatchNorm, merge
  and pool passes.
- ``tucker_fx.plan`` (gm.meta): the :class:`~tucker_fx.Plan` a compressed module was built from
  (``compress``, ``apply_plan``, ``load``).
- ``tucker_fx.capture`` (gm.meta): how the model was captured (``compress``, ``lower``).
- ``tucker_fx.lowering`` (gm.meta): the lowering chosen per layer by ``lower``.
- ``tucker_fx.stats`` (node.meta): the :class:`~tucker_fx.analysis.calibration.LayerStats` of a
  conv/linear node (channel second moments of its input and pre-bias output on calibration
  data); written by ``collect_stats`` (again layer by layer, on the partly compressed network, by
  ``fit_sequentially``), read by the rewrite when ``TuckerConfig(data_aware=True)``.
- ``tucker_fx.originals`` (gm.meta, only while the pipeline runs): ``dict[str, nn.Module]``, the
  layer each Tucker block replaced, by plan name; written by the rewrite, read by block lowering
  (the ``original`` candidate), dropped by the pipeline runner when the pipeline ends.

The names of the saved files (``tucker_fx.json``, format ``tucker_fx.compressed``) are not meta
keys; they live in :mod:`tucker_fx.io`.

Example:
    >>> import torch, torch.fx as fx
    >>> from tucker_fx._internal.meta import SITE_KEY, add_note, get_notes, get_site
    >>> gm = fx.symbolic_trace(torch.nn.Linear(2, 2))
    >>> node = next(iter(gm.graph.nodes))
    >>> get_site(node) is None, SITE_KEY in node.meta
    (True, False)
    >>> add_note(gm, "lin: kept"); get_notes(gm)
    ['lin: kept']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch.fx as fx

if TYPE_CHECKING:
    from tucker_fx.analysis.costs import NodeCost
    from tucker_fx.analysis.sites import Site
    from tucker_fx.planning.plan import Plan

__all__ = [
    "COST_KEY", "SITE_KEY", "ORIGIN_KEY", "NOTES_KEY", "PLAN_KEY", "CAPTURE_KEY", "LOWERING_KEY",
    "ORIGINALS_KEY", "STATS_KEY", "get_cost", "get_site", "get_plan", "get_notes", "add_note",
]

#: node.meta: the node's :class:`~tucker_fx.analysis.NodeCost` (params, MACs, FLOPs, shapes)
COST_KEY = "tucker_fx.cost"
#: node.meta: the normalised conv/linear :class:`~tucker_fx.analysis.Site` of a decomposable node
SITE_KEY = "tucker_fx.site"
#: node.meta: the name of the original node a Tucker block's node stands for
ORIGIN_KEY = "tucker_fx.origin"
#: gm.meta: ``list[str]``, what the graph passes did and did not do (BatchNorm folding, merges, pools)
NOTES_KEY = "tucker_fx.notes"
#: gm.meta: the :class:`~tucker_fx.Plan` a compressed module was built from
PLAN_KEY = "tucker_fx.plan"
#: gm.meta: how the model was captured (``"symbolic_trace"``, ``"export"``, ...)
CAPTURE_KEY = "tucker_fx.capture"
#: gm.meta: the lowering chosen per layer by :func:`tucker_fx.lower`
LOWERING_KEY = "tucker_fx.lowering"
#: gm.meta, while the pipeline runs: the original layer of each Tucker block (rewrite -> lowering)
ORIGINALS_KEY = "tucker_fx.originals"
#: node.meta: the calibration statistics of a conv/linear node (data-aware factors)
STATS_KEY = "tucker_fx.stats"


def get_cost(node: fx.Node) -> Optional[NodeCost]:
    """The cost record analysis stored on ``node``, or ``None`` if it was not analysed.

    Example:
        >>> import torch, torch.fx as fx
        >>> gm = fx.symbolic_trace(torch.nn.ReLU())
        >>> [get_cost(n) for n in gm.graph.nodes]
        [None, None, None]
    """
    return node.meta.get(COST_KEY)


def get_site(node: fx.Node) -> Optional[Site]:
    """The conv/linear site analysis stored on ``node``, or ``None`` when it is not one.

    Example:
        >>> import torch, torch.fx as fx
        >>> gm = fx.symbolic_trace(torch.nn.ReLU())
        >>> [get_site(n) for n in gm.graph.nodes]
        [None, None, None]
    """
    return node.meta.get(SITE_KEY)


def get_plan(module: Any) -> Optional[Plan]:
    """The plan a compressed ``GraphModule`` was built from; ``None`` for any other object.

    Example:
        >>> import torch, torch.fx as fx
        >>> get_plan(fx.symbolic_trace(torch.nn.ReLU())), get_plan(torch.nn.ReLU())
        (None, None)
    """
    if not isinstance(module, fx.GraphModule):
        return None
    return module.meta.get(PLAN_KEY)


def get_notes(gm: fx.GraphModule) -> list[str]:
    """The pass notes recorded on ``gm`` (an empty list when there are none; not stored).

    Example:
        >>> import torch, torch.fx as fx
        >>> get_notes(fx.symbolic_trace(torch.nn.ReLU()))
        []
    """
    return list(gm.meta.get(NOTES_KEY, []))


def add_note(gm: fx.GraphModule, note: str) -> None:
    """Append one line to the pass notes of ``gm``.

    Example:
        >>> import torch, torch.fx as fx
        >>> gm = fx.symbolic_trace(torch.nn.ReLU())
        >>> add_note(gm, "relu: kept"); gm.meta[NOTES_KEY]
        ['relu: kept']
    """
    gm.meta.setdefault(NOTES_KEY, []).append(note)
