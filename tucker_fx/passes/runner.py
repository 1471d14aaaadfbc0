"""Run graph passes: each is ``gm -> PassResult(gm, modified)``; the runner lints,
recompiles and re-raises failures with the pass's name.

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.fx.passes.infra.pass_base import PassResult
    >>> from tucker_fx.passes.runner import run_passes
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    >>> run_passes(gm, [lambda g: PassResult(g, False)]) is gm
    True
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["PassResult", "GraphPass", "run_passes", "PassError"]

GraphPass = Callable[[fx.GraphModule], PassResult]


class PassError(RuntimeError):
    """A graph pass failed; the message names the pass."""


def _name(p: GraphPass) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass]) -> fx.GraphModule:
    """Apply ``passes`` in order; lint and recompile after each one that modified the graph."""
    for p in passes:
        try:
            result = p(gm)
        except (ValueError, TypeError):
            raise  # bad user input: already says what and where
        except Exception as exc:
            raise PassError(f"graph pass {_name(p)!r} failed: {type(exc).__name__}: {exc}") from exc
        gm = result.graph_module
        if result.modified:
            try:
                gm.graph.lint()
            except Exception as exc:
                raise PassError(f"graph pass {_name(p)!r} left an invalid graph: {exc}") from exc
            gm.recompile()
    return gm
