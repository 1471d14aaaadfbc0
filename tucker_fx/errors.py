"""Exceptions raised for bad input. All derive from ValueError or TypeError."""

from __future__ import annotations

__all__ = ["UntraceableModelError", "ShapePropagationError", "DecompositionError", "TuckerWarning", "SlowerThanOriginalWarning",
           "CaptureWarning", "PoorCompressionWarning", "PlanEditedWarning", "TargetNotMetWarning"]


class UntraceableModelError(ValueError):
    """No capture path worked (``torch.fx.symbolic_trace``, ``torch.export``); the message names each
    path's failure, the construct, and the remedies."""


class ShapePropagationError(ValueError):
    """The example inputs do not fit the model; the message names the failing node."""


class DecompositionError(ValueError):
    """A layer cannot be decomposed (NaN/Inf weights, bad ranks); the message names it."""


class TuckerWarning(UserWarning):
    """Base class of the warnings tucker_fx gives."""


class CaptureWarning(TuckerWarning):
    """``symbolic_trace`` computed something else than the model; it was captured with ``torch.export``."""


class PoorCompressionWarning(TuckerWarning):
    """The compressed model is far from the original (low SQNR or top-1 agreement)."""


class PlanEditedWarning(TuckerWarning):
    """``result.plan`` was edited after compressing: ``save`` writes the plan the module was built with."""


class SlowerThanOriginalWarning(TuckerWarning):
    """The compressed model ran slower than the original at the example inputs (the figures are in
    the message and in ``CompressionResult.timing``)."""


class TargetNotMetWarning(TuckerWarning):
    """A ``TuckerConfig.target_*`` could not be met: even the cheapest allocation misses it, or the
    measured speed-up stayed short after every round; the result is the closest one found."""
