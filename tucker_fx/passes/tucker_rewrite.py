"""The rewrite pass: each planned conv/linear node becomes its Tucker subgraph.

A module site keeps its qualified name: ``c1`` becomes a :class:`TuckerBlock` at ``c1`` and
the graph calls ``c1.first``, ``c1.core``, ``c1.last`` (nodes ``c1_first``, ...). A functional
site (``F.conv3d`` on a ``get_attr`` weight) gets a block named after its node, and the
now-unused weight is deleted. The pass only reads the plan and the analysis records.

A planned layer whose output never reaches the graph's output (dead code: a deep-supervision
head computed but not returned, an unused branch) is not decomposed: the dead-code elimination
that follows the rewrite removes it, so its plan entry becomes ``kind="none"`` with a reason
that says so, and ``0`` params/MACs after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.graph import block_name
from tucker_fx._internal.meta import ORIGIN_KEY, ORIGINALS_KEY, SITE_KEY, STATS_KEY, get_site
from tucker_fx._internal.progress import Progress
from tucker_fx.analysis.sites import Site
from tucker_fx.errors import DecompositionError
from tucker_fx.passes.blocks import TuckerBlock, build_block, data_aware_inputs
from tucker_fx.passes.runner import PassResult
from tucker_fx.planning.plan import LayerPlan, Plan

__all__ = ["TuckerRewrite", "ORIGIN_KEY", "DEAD_REASON", "block_name", "dead_nodes", "original_module"]

DEAD_REASON = ("dead code: the layer's output does not reach the model's output, so it is removed from the "
               "compressed graph (with its weights) instead of being decomposed")


def dead_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that ``graph.eliminate_dead_code()`` would remove (unused and side-effect free,
    directly or through other such nodes)."""
    impure_random = True  # as eliminate_dead_code decides it
    if torch._guards.TracingContext.try_get():
        import torch._inductor.config as inductor_config

        impure_random = inductor_config.fallback_random
    dead: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if all(user in dead for user in node.users) and not node.is_impure(impure_random):
            dead.add(node)
    return dead


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def original_module(gm: fx.GraphModule, site: Site) -> nn.Module:
    """The layer before decomposition, as a module (functional sites get an equivalent one)."""
    if site.module_name is not None:
        return gm.get_submodule(site.module_name)
    weight, bias = site.weight(gm), site.bias(gm)
    if site.op == "linear":
        m: nn.Module = nn.Linear(site.in_channels, site.out_channels, bias=bias is not None)
    else:
        m = _CONV[site.spatial_dims](site.in_channels, site.out_channels, site.kernel_size, bias=bias is not None,
                                     groups=site.groups, **_conv_args(site))
    m = m.to(weight)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


def _same_layer(other: Site, site: Site) -> bool:
    return other.display_name == site.display_name and (other.op, other.stride, other.padding, other.dilation,
                                                        other.groups, other.padding_mode) == \
        (site.op, site.stride, site.padding, site.dilation, site.groups, site.padding_mode)


def _conv_args(site: Site) -> dict:
    return dict(stride=site.stride, padding=site.padding, dilation=site.dilation,
                padding_mode=site.padding_mode)


@dataclass
class TuckerRewrite:
    """Graph pass: replace the plan's layers by decomposed blocks. Fills ``weight_error``.

    Hands the layer each block replaced to the lowering in ``gm.meta[ORIGINALS_KEY]`` (by plan
    name; ``originals`` is the same mapping, kept for callers that run the pass by hand)."""

    plan: Plan
    hooi_iters: int = 2
    solver: str = "gram"
    progress: Optional[Progress] = None
    name: str = "tucker_rewrite"
    blocks: dict[str, TuckerBlock] = field(default_factory=dict)
    originals: dict[str, nn.Module] = field(default_factory=dict)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        applied = self.plan.applied
        dead = dead_nodes(gm.graph)
        for entry in self.plan.layers:  # left alone, but removed with the dead code all the same
            node = nodes.get(entry.node)
            if not entry.applied and node is not None and SITE_KEY in node.meta and self._is_dead(gm, node, dead):
                self._mark_dead(entry)
        for i, entry in enumerate(applied):
            node = nodes.get(entry.node)
            site: Optional[Site] = get_site(node) if node is not None else None
            if site is None or site.display_name != entry.name:
                raise ValueError(
                    f"the plan's layer {entry.name!r} (node {entry.node!r}) is not a conv/linear "
                    f"of this model; its layers are: "
                    f"{[n.meta[SITE_KEY].display_name for n in gm.graph.nodes if SITE_KEY in n.meta]}"
                )
            if self._is_dead(gm, node, dead):
                self._mark_dead(entry)
                continue
            if self.progress is not None:
                self.progress.step(i + 1, len(applied), f"decomposing {entry.name} ({entry.kind} {entry.ranks})")
            self._rewrite(gm, site, entry, nodes)
        self._drop_unused(gm)
        for entry in applied:  # what the dead-code elimination removed after all
            if entry.applied and not any(str(n.target).rpartition(".")[0] == block_name(entry)
                                         for n in gm.graph.nodes if n.op == "call_module"):
                self.blocks.pop(entry.name, None)
                self.originals.pop(entry.name, None)
                self._mark_dead(entry)
        gm.meta[ORIGINALS_KEY] = dict(self.originals)
        return PassResult(gm, bool(applied))

    @staticmethod
    def _is_dead(gm: fx.GraphModule, node: fx.Node, dead: set[fx.Node]) -> bool:
        """Every call of ``node``'s layer is dead code."""
        site = node.meta[SITE_KEY]
        return all(n in dead for n in gm.graph.nodes if SITE_KEY in n.meta and _same_layer(n.meta[SITE_KEY], site))

    @staticmethod
    def _mark_dead(entry: LayerPlan) -> None:
        """The plan says what happens to a dead layer: removed, not decomposed."""
        entry.kind, entry.ranks, entry.as_conv = "none", None, False
        entry.reason = DEAD_REASON
        entry.macs_after = entry.params_after = 0
        entry.weight_error, entry.lowering, entry.lowering_source = None, None, None
        entry.timings_ms = {}

    def _rewrite(self, gm: fx.GraphModule, site: Site, entry: LayerPlan, nodes: dict[str, fx.Node]) -> None:
        weight, bias = site.weight(gm), site.bias(gm)
        if entry.as_conv and entry.feature_shape is None:
            raise ValueError(f"plan entry {entry.name!r}: as_conv needs feature_shape")
        try:
            block, error = build_block(
                weight, bias, kind=entry.kind, ranks=tuple(entry.ranks or ()), op=site.op,
                conv_args=_conv_args(site) if site.op == "conv" else None,
                feature_shape=entry.feature_shape if entry.as_conv else None,
                hooi_iters=self.hooi_iters, solver=self.solver, **self._covariances(site, entry),
            )
        except ValueError as exc:
            raise DecompositionError(f"layer {entry.name!r}: {exc}") from exc
        entry.weight_error = error
        self.originals[entry.name] = original_module(gm, site)
        name = block_name(entry)
        if site.module_name is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, block)
        else:
            gm.add_submodule(name, block)
        self.blocks[entry.name] = block
        # every call of a shared layer goes through the one block (same weight, same geometry)
        targets = [n for n in gm.graph.nodes if SITE_KEY in n.meta and _same_layer(n.meta[SITE_KEY], site)]
        for node in targets:
            self._splice(gm, node, entry, name, block, nodes)

    def _covariances(self, site: Site, entry: LayerPlan) -> dict[str, Any]:
        """The layer's calibration statistics, when its plan entry asks for data-aware factors."""
        if entry.factors != "data" or entry.as_conv:
            return {}
        stats = site.node.meta.get(STATS_KEY)
        if stats is None:
            entry.notes.append("factors='data' but no calibration statistics (pass calibration=): weight-only factors")
            entry.factors = "weights"
            return {}
        return data_aware_inputs(site.op, entry.kind, stats)

    @staticmethod
    def _splice(gm: fx.GraphModule, node: fx.Node, entry: LayerPlan, name: str, block: TuckerBlock,
                nodes: dict[str, fx.Node]) -> None:
        graph = gm.graph
        x = nodes[entry.input_node] if entry.as_conv and entry.input_node else node.args[0]
        with graph.inserting_before(node):
            if hasattr(block, "first"):
                x = graph.call_module(f"{name}.first", (x,))
                x.meta[ORIGIN_KEY] = node.name
            if block.flatten:
                x = graph.call_function(torch.flatten, (x, 1))
            x = graph.call_module(f"{name}.core", (x,))
            x.meta[ORIGIN_KEY] = node.name
            x = graph.call_module(f"{name}.last", (x,))
            x.meta[ORIGIN_KEY] = node.name
        node.replace_all_uses_with(x)
        graph.erase_node(node)
        # a later "as a conv" entry may name this node as its input (conv -> flatten -> linear):
        # it must find the block's output, not the erased node
        nodes[node.name] = x

    @staticmethod
    def _drop_unused(gm: fx.GraphModule) -> None:
        graph = gm.graph
        attrs = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
        graph.eliminate_dead_code()  # also drops the get_attr nodes of replaced weights ...
        still_used = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
        for target in attrs - still_used:  # ... but not the tensors they read: delete those
            parent, _, leaf = target.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            if hasattr(owner, leaf):
                delattr(owner, leaf)
        gm.delete_all_unused_submodules()
