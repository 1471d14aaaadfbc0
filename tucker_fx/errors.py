"""Exceptions raised for bad input. All derive from ValueError or TypeError."""

from __future__ import annotations

__all__ = ["UntraceableModelError", "ShapePropagationError", "DecompositionError"]


class UntraceableModelError(ValueError):
    """``torch.fx.symbolic_trace`` failed; the message names the construct and the remedies."""


class ShapePropagationError(ValueError):
    """The example inputs do not fit the model; the message names the failing node."""


class DecompositionError(ValueError):
    """A layer cannot be decomposed (NaN/Inf weights, bad ranks); the message names it."""
