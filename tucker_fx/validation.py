"""Numerical validation: the compressed model against the original, end to end and per layer.

Example:
    >>> import torch, torch.nn as nn, tucker_fx
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 16, 16)
    >>> result = tucker_fx.compress(model, x, config=tucker_fx.TuckerConfig(rank=1.0, only_if_cheaper=False))
    >>> result.validation.rel_error < 1e-5
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from tucker_fx._internal.meta import get_plan
from tucker_fx.errors import ShapePropagationError, UntraceableModelError

__all__ = ["ValidationReport", "validate", "capture_activations", "check_runnable_inputs"]


@dataclass
class ValidationReport:
    """Errors of the compressed model's output against the original's.

    ``rel_error`` = ||y - y_hat|| / ||y|| (L2 over all outputs), ``sqnr_db`` =
    10 log10(||y||^2 / ||y - y_hat||^2), ``top1_agreement`` (fraction of rows whose argmax
    agrees; ``None`` unless the output looks like logits), and ``layer_errors``: for each
    decomposed layer, the relative error of its own output on the original's activations.
    """

    rel_error: float
    max_abs_error: float
    sqnr_db: float
    top1_agreement: Optional[float]
    layer_errors: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        top1 = f", top-1 agreement {self.top1_agreement:.1%}" if self.top1_agreement is not None else ""
        layers = "".join(f"\n  {k}: rel. error {v:.3g}" for k, v in self.layer_errors.items())
        return (f"rel. L2 error {self.rel_error:.3g}, max abs error {self.max_abs_error:.3g}, "
                f"SQNR {self.sqnr_db:.1f} dB{top1}{layers}")


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def capture_activations(gm: fx.GraphModule, inputs: tuple, names: set[str]) -> dict[str, Any]:
    """Run ``gm`` on ``inputs`` and keep the values of the nodes in ``names``."""
    rec = _Recorder(gm, names)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def _rel(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref64, approx64 = ref.detach().double(), approx.detach().double()
    denom = ref64.norm().item()
    diff = (ref64 - approx64).norm().item()
    return diff / denom if denom > 0 else diff


class _EvalCopies:
    """Both models in eval mode for the comparison, their flags restored afterwards."""

    def __init__(self, *models: nn.Module) -> None:
        self.models = models
        self.flags = [[m.training for m in model.modules()] for model in models]

    def __enter__(self) -> None:
        for model in self.models:  # the flags themselves: ``ep.module()`` refuses .eval()
            for m in model.modules():
                m.training = False

    def __exit__(self, *exc: Any) -> None:
        for model, flags in zip(self.models, self.flags):
            for m, flag in zip(model.modules(), flags):
                m.training = flag


def check_runnable_inputs(fn: str, inputs: tuple) -> None:
    """Validation runs both models: every tensor input must be real (not ``meta``) and finite.

    Example:
        >>> check_runnable_inputs("validate", (torch.tensor([1.0, float("nan")]),))
        Traceback (most recent call last):
        ...
        ValueError: validate: example input 0 has 1 NaN/Inf value(s); expected finite inputs to validate on
    """
    for i, a in enumerate(tree_flatten(inputs)[0]):
        if not isinstance(a, torch.Tensor):
            continue
        if a.is_meta:
            raise ValueError(
                f"{fn}: example input {i} is a meta tensor (a shape, no values); validation runs the models: "
                "expected real inputs, or TuckerConfig(validate=False)"
            )
        if a.is_floating_point() or a.is_complex():
            bad = int((~torch.isfinite(a)).sum())
            if bad:
                raise ValueError(f"{fn}: example input {i} has {bad} NaN/Inf value(s); expected finite inputs "
                                 "to validate on")


def validate(original: nn.Module, compressed: nn.Module, *inputs: Any,
             reference_graph: Optional[fx.GraphModule] = None) -> ValidationReport:
    """Compare ``compressed`` with ``original`` on ``inputs`` (both run in eval mode, no grad).

    Per-layer errors need the plan that ``tucker_fx.compress`` stores in
    ``compressed.meta["tucker_fx.plan"]`` and a traced reference graph (built here from
    ``original`` when not given). ``original`` is never modified: it runs as a copy.

    Raises ``ShapePropagationError`` (naming the node) when the inputs do not fit one of the
    models (too many or too few, another shape, rank or dtype), ``ValueError`` when the two
    models' outputs differ in structure or an input is NaN/Inf or on the meta device.
    """
    if not isinstance(original, nn.Module) or not isinstance(compressed, nn.Module):
        raise TypeError(
            f"validate expects two nn.Modules, got {type(original).__name__} and {type(compressed).__name__}"
        )
    check_runnable_inputs("validate", inputs)
    from tucker_fx.analysis.capture import copy_model

    reference = copy_model(original)
    with _EvalCopies(reference, compressed), torch.no_grad():
        ys = _flat_tensors(_run("original", reference, inputs))
        yhats = _flat_tensors(_run("compressed", compressed, inputs))
        if len(ys) != len(yhats) or any(a.shape != b.shape for a, b in zip(ys, yhats)):
            raise ValueError(
                f"the models' outputs differ in structure: {[tuple(a.shape) for a in ys]} vs "
                f"{[tuple(b.shape) for b in yhats]}"
            )
        y = torch.cat([t.detach().double().flatten() for t in ys])
        yhat = torch.cat([t.detach().double().flatten() for t in yhats])
        noise = (y - yhat).norm().item()
        rel = noise / y.norm().item() if y.norm().item() > 0 else noise
        sqnr = 10 * math.log10(y.pow(2).sum().item() / noise**2) if noise > 0 else math.inf
        top1 = None
        if len(ys) == 1 and ys[0].dim() == 2 and ys[0].shape[1] > 1 and not ys[0].is_complex():
            top1 = (ys[0].argmax(1) == yhats[0].argmax(1)).double().mean().item()
        layer_errors = _layer_errors(reference, compressed, inputs, reference_graph)
    return ValidationReport(rel, (y - yhat).abs().max().item() if y.numel() else 0.0, sqnr, top1, layer_errors)


def _run(label: str, model: nn.Module, inputs: tuple) -> Any:
    """``model(*inputs)``; inputs that do not fit it get a :class:`ShapePropagationError`
    naming the node, as in ``compress`` (found by propagating the shapes through a trace)."""
    try:
        return model(*inputs)
    except Exception as exc:
        problem = _why_inputs_do_not_fit(model, inputs)
        if problem is None:
            raise  # the inputs fit: a failure of the model itself, as torch reported it
        raise ShapePropagationError(f"validate: the {label} model does not take these example inputs: "
                                    f"{problem}") from exc


def _why_inputs_do_not_fit(model: nn.Module, inputs: tuple) -> Optional[str]:
    """The shape propagation error of ``inputs`` on ``model``; ``None`` if they fit, or if
    ``model`` cannot be traced (then torch's own error stands)."""
    from tucker_fx.analysis.capture import capture
    from tucker_fx.analysis.shapes import propagate_shapes

    try:
        gm = capture(model)
    except UntraceableModelError:
        return None
    try:
        propagate_shapes(gm, inputs)
    except ShapePropagationError as exc:
        return str(exc)
    return None


def _layer_errors(reference: nn.Module, compressed: nn.Module, inputs: tuple,
                  reference_graph: Optional[fx.GraphModule]) -> dict[str, float]:
    from tucker_fx._internal.graph import block_name

    plan = get_plan(compressed)
    if plan is None or not plan.applied:
        return {}
    if reference_graph is None:
        from tucker_fx.analysis.capture import capture

        reference_graph = capture(reference)
    wanted = {e.node for e in plan.applied} | {e.input_node for e in plan.applied if e.input_node}
    acts = capture_activations(reference_graph, inputs, wanted)
    errors = {}
    for entry in plan.applied:
        if entry.node not in acts or entry.input_node not in acts:
            continue
        try:
            block = compressed.get_submodule(block_name(entry))
        except AttributeError:
            continue  # merged away entirely into its neighbours
        if getattr(block, "partial", False):
            continue  # merged with a neighbour: its error shows in the end-to-end figures
        errors[entry.name] = _rel(acts[entry.node], block(acts[entry.input_node]))
    return errors
