"""A Linear-only MLP from a list of layer widths, for the MLP workflow (docs/mlp_example.md).

Example:
    >>> from tucker_fx.apps.mlp.model import mlp
    >>> net = mlp([64, 32, 32, 10])
    >>> net
    MLP(
      (0): Linear(in_features=64, out_features=32, bias=True)
      (1): ReLU()
      (2): Linear(in_features=32, out_features=32, bias=True)
      (3): ReLU()
      (4): Linear(in_features=32, out_features=10, bias=True)
    )
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["MLP", "mlp"]


class MLP(nn.Sequential):
    """Linear -> activation -> ... -> Linear (no activation after the last layer)."""


def mlp(widths: Sequence[int], *, activation: Callable[[], nn.Module] = nn.ReLU,
        seed: Optional[int] = 0) -> MLP:
    """An :class:`MLP` with ``len(widths) - 1`` Linear layers: ``widths[0]`` inputs,
    ``widths[-1]`` outputs. ``seed`` fixes the initial weights (``None``: the global RNG)."""
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"mlp: expected at least two widths (inputs, outputs), got {widths!r}")
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"mlp: widths must be positive ints, got {widths!r}")

    def build() -> MLP:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(activation())
        return MLP(*layers)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
