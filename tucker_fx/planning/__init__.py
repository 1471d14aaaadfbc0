"""Planning: which layers to decompose, how, at which ranks (plain data)."""

from tucker_fx.planning.plan import KINDS, PLAN_VERSION, LayerPlan, Plan
from tucker_fx.planning.planner import build_plan, candidate_sites, flatten_source

__all__ = ["KINDS", "PLAN_VERSION", "LayerPlan", "Plan", "build_plan", "candidate_sites", "flatten_source"]
