"""Searches over plans: budgeted compression (ranks per layer for a speed, FLOPs or size target).

Uses every stage below it (analysis, decomposition, planning, passes); ``tucker_fx.compress`` calls
it when ``TuckerConfig`` sets a ``target_*``.
"""

from .budgeted import FRACTIONS, MAX_ROUNDS, SEARCH_BATCHES, SearchReport, budgeted_plan, candidate_ranks

__all__ = ["FRACTIONS", "MAX_ROUNDS", "SEARCH_BATCHES", "SearchReport", "budgeted_plan", "candidate_ranks"]
