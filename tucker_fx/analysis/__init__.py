"""Analysis passes: capture, fake-tensor shape propagation, per-node cost records."""

from tucker_fx.analysis.capture import capture
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, CostRegistry, OpCost
from tucker_fx.analysis.costs import COST_KEY, SITE_KEY, CostReport, NodeCost, analyze, annotate_costs
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.analysis.sites import Site, site_of

__all__ = [
    "capture", "REGISTRY", "CostContext", "CostRegistry", "OpCost", "COST_KEY", "SITE_KEY",
    "CostReport", "NodeCost", "analyze", "annotate_costs", "propagate_shapes", "Site", "site_of",
]
