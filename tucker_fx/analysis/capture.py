"""Turn what the user hands us into an ``fx.GraphModule`` without touching their model.

:func:`capture` is ``torch.fx.symbolic_trace`` on a copy; :func:`capture_model` is what the verbs
use: ``symbolic_trace`` first (nodes keep the module names), checked against the model itself on
the example inputs, then ``torch.export.export(model, args, strict=False)`` when tracing fails,
does not take the inputs, or computes something else than the model (a branch that tracing cannot
see, such as ``isinstance`` / ``torch.jit.isinstance`` / ``torch.is_tensor`` on a proxy).

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
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx.errors import CaptureWarning, ShapePropagationError, UntraceableModelError

__all__ = ["capture", "capture_model", "copy_model", "Captured", "CAPTURE_PATHS", "check_capture"]

CAPTURE_PATHS = ("symbolic_trace", "export")
"""The ways :func:`capture_model` can capture an ``nn.Module``, tried in this order with ``path="auto"``."""


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


@dataclass
class Captured:
    """What :func:`capture_model` made: ``gm`` (a fresh GraphModule on a copy of the weights, with
    ``tensor_meta`` on every node), ``path`` (``"symbolic_trace"``, ``"export"``, or
    ``"graph_module"`` for a GraphModule taken as it is) and ``notes`` (why a path was passed over,
    and whether the graph was checked against the model)."""

    gm: fx.GraphModule
    path: str
    notes: list[str] = field(default_factory=list)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else repr(exc)}"


def _runnable(inputs: tuple) -> bool:
    """Real (not meta), finite tensors: the model can be run on them for a check."""
    from torch.utils._pytree import tree_flatten

    for a in tree_flatten(inputs)[0]:
        if isinstance(a, torch.Tensor):
            if a.is_meta or ((a.is_floating_point() or a.is_complex()) and not bool(torch.isfinite(a).all())):
                return False
    return True


def _tolerance(tensors: list[torch.Tensor]) -> float:
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    return 2e-2 if low else 1e-3


def check_capture(model: nn.Module, gm: fx.GraphModule, inputs: tuple) -> Optional[str]:
    """Why ``gm`` does not compute what ``model`` computes on ``inputs``, or ``None`` if it does
    (relative L2 error of all tensor outputs within 1e-3, 2e-2 for half types).

    Both run on copies (a training-mode BatchNorm's statistics stay as they were), under
    ``no_grad``, on the same random draws (the RNG state is forked and both start from one seed),
    each in the train/eval mode it has. A model that itself fails on ``inputs`` is not checked
    (``None``: the caller's own checks report it); the caller's random stream does not move.
    """
    from torch.utils._pytree import tree_flatten

    reference = copy_model(model)
    graph = copy.deepcopy(gm) if any(m.training for m in gm.modules()) else gm
    devices = sorted({a.device.index or 0 for a in tree_flatten(inputs)[0]
                      if isinstance(a, torch.Tensor) and a.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(0)
        try:
            y = reference(*inputs)
        except Exception:
            return None  # the model itself fails on these inputs: validation reports it as torch says
        torch.manual_seed(0)
        try:
            y_hat = graph(*inputs)
        except Exception as exc:
            return f"the captured graph fails on the example inputs where the model runs ({_first_line(exc)})"
    ys = [t for t in tree_flatten(y)[0] if isinstance(t, torch.Tensor)]
    yhats = [t for t in tree_flatten(y_hat)[0] if isinstance(t, torch.Tensor)]
    if [tuple(t.shape) for t in ys] != [tuple(t.shape) for t in yhats]:
        return (f"the captured graph returns tensors of shapes {[tuple(t.shape) for t in yhats]}, the model "
                f"{[tuple(t.shape) for t in ys]}")
    if not ys:
        return None
    a = torch.cat([t.detach().double().flatten().cpu() for t in ys])
    b = torch.cat([t.detach().double().flatten().cpu() for t in yhats])
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
        return "the captured graph's outputs are NaN/Inf where the model's are not (or the other way round)"
    a, b = a[finite], b[finite]
    norm = a.norm().item()
    err = (a - b).norm().item() / (norm if norm > 0 else 1.0)
    tol = _tolerance(ys)
    if err > tol:
        return f"the captured graph's output differs from the model's: rel. L2 error {err:.3g} (tolerance {tol:g})"
    return None


def _export(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    """``torch.export.export(copy, inputs, strict=False).module()``; meta inputs are replaced by
    zeros of their shape on the CPU (export traces with fake tensors: the values are not read)."""
    def real(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.is_meta:
            return torch.zeros(a.shape, dtype=a.dtype)
        return a

    args = tuple(real(a) for a in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export
        ep = torch.export.export(copy_model(model), args, strict=False)
        module = ep.module()
        # a plain GraphModule (``ep.module()`` refuses .train()/.eval(), which validation and finetune call)
        return fx.GraphModule(module, copy.deepcopy(module.graph), class_name=type(model).__name__)


def _failure_text(path: str, exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, UntraceableModelError) and exc.__cause__ is not None else exc
    where = _user_frame(cause)
    return f"{path}: {_first_line(cause)}" + (f"\n    at {where}" if where else "")


def _remedies(verb: str) -> str:
    own = ("; or trace around it: tucker_fx.analyze(model, x, concrete_args={...}) fixes arguments, "
           "leaf_modules=[TheClass] keeps a module uncounted as one node" if verb == "analyze" else "")
    return (
        "Remedies: fix the Python construct named above (data-dependent `if` on a tensor value -> torch.where "
        "or torch.cond; a tensor used as a dict key -> key by name or index); or export the model yourself, "
        "choosing strict / dynamic_shapes as it needs, ep = torch.export.export(model, (x,), ...), and "
        f"pass the ExportedProgram: tucker_fx.{verb}(ep, ...); or compile it with "
        "torch.compile(model, backend='tucker'), which decomposes each captured graph and lets the rest of "
        f"the model run as Python (graph breaks){own}."
    )


def capture_model(model: nn.Module, example_inputs: tuple, *, path: str = "auto", check: bool = True,
                  verb: str = "compress") -> Captured:
    """Capture ``model`` on ``example_inputs`` into a fresh GraphModule (on a copy of its weights)
    with shapes propagated (``node.meta["tensor_meta"]``).

    ``path="auto"`` tries ``torch.fx.symbolic_trace`` (node names are module names), then
    ``torch.export.export(model, inputs, strict=False)``; ``"symbolic_trace"`` or ``"export"``
    uses that one only. With ``check`` and runnable inputs, the captured graph is run against the
    model itself (:func:`check_capture`): a trace that disagrees (tracing took another branch than
    the model) is passed over for export with a :class:`~tucker_fx.errors.CaptureWarning`. A
    trace whose shape propagation fails is tried with export before the inputs are blamed.
    An ``fx.GraphModule`` is taken as it is (``path="graph_module"``).

    Raises :class:`~tucker_fx.errors.UntraceableModelError` naming each path's failure and the
    remedies, :class:`~tucker_fx.errors.ShapePropagationError` when the inputs do not fit the
    model, ``ValueError`` when the only allowed path disagrees with the model.
    """
    from tucker_fx.analysis.shapes import propagate_shapes

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module or torch.fx.GraphModule, got {type(model).__name__}")
    if path not in ("auto",) + CAPTURE_PATHS:
        raise ValueError(f"capture must be 'auto', 'symbolic_trace' or 'export', got {path!r}")
    name = type(model).__name__
    can_check = check and _runnable(tuple(example_inputs))
    unchecked = [] if can_check or not check else [
        "the captured graph was not checked against the model (meta or NaN/Inf example inputs)"]
    if isinstance(model, fx.GraphModule):
        gm = capture(model, copy_weights=True)
        propagate_shapes(gm, example_inputs)
        return Captured(gm, "graph_module", [])
    failures: list[str] = []
    shape_error: Optional[ShapePropagationError] = None
    mistrace: Optional[str] = None
    if path in ("auto", "symbolic_trace"):
        try:
            gm = capture(model, copy_weights=True)
        except UntraceableModelError as exc:
            if path == "symbolic_trace":
                raise
            failures.append(_failure_text("torch.fx.symbolic_trace", exc))
        else:
            try:
                propagate_shapes(gm, example_inputs)
            except ShapePropagationError as exc:
                if path == "symbolic_trace":
                    raise
                shape_error = exc
            else:
                mistrace = check_capture(model, gm, tuple(example_inputs)) if can_check else None
                if mistrace is None:
                    return Captured(gm, "symbolic_trace", list(unchecked))
                if path == "symbolic_trace":
                    raise ValueError(f"{verb}: torch.fx.symbolic_trace's graph of {name} does not compute what the "
                                     f"model computes: {mistrace}; expected the same output: capture it with "
                                     "capture='export' (or 'auto')")
    try:
        gm = _export(model, tuple(example_inputs))
        propagate_shapes(gm, example_inputs)
    except Exception as exc:
        if shape_error is not None:  # export fails too: the inputs do not fit the model
            raise ShapePropagationError(
                f"{shape_error}\n(torch.export.export(strict=False) failed on these inputs too: {_first_line(exc)})"
            ) from shape_error
        if mistrace is not None:
            raise UntraceableModelError(
                f"{verb}: torch.fx.symbolic_trace's graph of {name} does not compute what the model computes "
                f"({mistrace}), and torch.export.export(strict=False) failed: {_failure_text('export', exc)}\n"
                + _remedies(verb)) from exc
        failures.append(_failure_text("torch.export.export(strict=False)", exc))
        raise UntraceableModelError(
            f"{verb}: could not capture {name}; each path failed:\n  - " + "\n  - ".join(failures) + "\n"
            + _remedies(verb)) from exc
    notes = list(unchecked)
    if mistrace is not None:
        why = (f"torch.fx.symbolic_trace's graph of {name} does not compute what the model computes ({mistrace}): "
               "tracing took another branch than the model (isinstance / torch.jit.isinstance / torch.is_tensor "
               "on a traced value are False); captured with torch.export instead")
        warnings.warn(why, CaptureWarning, stacklevel=5)
        notes.append(why)
    elif shape_error is not None:
        why = (f"torch.fx.symbolic_trace's graph of {name} does not take the example inputs ({str(shape_error)[:300]}) "
               "while the model does: tracing took another branch than the model; captured with torch.export "
               "instead")
        warnings.warn(why, CaptureWarning, stacklevel=5)
        notes.append(why)
    elif failures:
        notes.append(f"captured with torch.export (non-strict): {failures[0]}".replace("\n   ", ""))
    mode = "training" if model.training else "eval"
    notes.append(f"torch.export fixed the model's {mode}-mode behaviour in the graph (BatchNorm statistics, "
                 "Dropout): .train()/.eval() on the result do not change it")
    if can_check:
        disagreement = check_capture(model, gm, tuple(example_inputs))
        if disagreement is not None:
            raise ValueError(f"{verb}: torch.export's graph of {name} does not compute what the model computes: "
                             f"{disagreement}; expected the same output (a random forward that draws "
                             "differently, or a model whose output depends on state it changes)")
    return Captured(gm, "export", notes)
