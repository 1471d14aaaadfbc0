"""Turn what the user hands us into an ``fx.GraphModule`` without touching their model.

Example:
    >>> import torch.nn as nn
    >>> from tucker_fx.analysis.capture import capture
    >>> gm = capture(nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import copy
import os
import traceback
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx.errors import UntraceableModelError

__all__ = ["capture", "copy_model"]


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        from tucker_fx.kernels import FFTConv, LinearChain, TuckerFFTConv, WindowMax  # our kernels stay one node

        if isinstance(m, (FFTConv, TuckerFFTConv, LinearChain, WindowMax)):
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> Optional[str]:
    """The innermost traceback frame outside torch: where the untraceable construct is."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.dirname(__file__))
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith((torch_dir, here)):
            found = frame
    if found is None:
        return None
    line = (found.line or "").strip()
    return f"{found.filename}:{found.lineno} in {found.name}: {line}"


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``; a model that cannot be copied gets a ``TypeError`` that says so
    (every pass works on a copy: the user's model is never touched)."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(
            f"tucker_fx works on a copy of the model and could not deep-copy {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}; expected a model that copy.deepcopy can copy (move locks, open "
            "files, generators and similar handles out of the module)"
        ) from exc


def capture(
    model: nn.Module,
    *,
    copy_weights: bool = False,
    concrete_args: Optional[dict[str, Any]] = None,
    leaf_modules: Iterable[type] = (),
) -> fx.GraphModule:
    """Trace ``model`` (or copy the graph of a ``GraphModule``) into a fresh GraphModule.

    The result never shares its ``Graph`` with the input, so meta written on its nodes does
    not leak into the user's objects. With ``copy_weights=True`` the modules are deep-copied
    too, so a rewrite that swaps submodules cannot reach the user's model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module or torch.fx.GraphModule, got {type(model).__name__}"
        )
    if copy_weights:
        model = copy_model(model)
    if isinstance(model, fx.GraphModule):
        return fx.GraphModule(model, copy.deepcopy(model.graph), class_name=type(model).__name__)
    tracer = _LeafTracer(tuple(leaf_modules))
    if tracer.is_leaf_module(model, ""):
        # a bare nn.Conv3d / nn.Linear: keep it a call_module site instead of tracing its body
        model = nn.Sequential(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # symbolic tracing raises many types; all mean "untraceable"
        where = _user_frame(exc)
        raise UntraceableModelError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}"
            + (f"\n  at {where}" if where else "")
            + "\nRemedies: pass concrete_args={...} to fix the inputs that steer control flow; "
            "pass leaf_modules=[TheSubmoduleClass] so that the offending submodule is kept "
            "whole; or compile the model with torch.compile(model, backend='tucker'), which "
            "does not need symbolic tracing."
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, class_name=name)
