"""The compression plan: plain data a user can print, edit, save and re-apply.

Example:
    >>> import torch, tucker_fx
    >>> from tucker_fx.models import thetis_net, thetis_paper_config, THETIS_INPUT_SHAPE
    >>> x = torch.randn(THETIS_INPUT_SHAPE)
    >>> result = tucker_fx.compress(thetis_net(), x, config=thetis_paper_config())
    >>> result.plan["c2"].kind, result.plan["c2"].ranks
    ('tucker2', (2, 3))
    >>> result.plan["c2"].ranks = (3, 4)            # edit ...
    >>> again = tucker_fx.apply_plan(thetis_net(), result.plan, x)  # ... and re-apply
    >>> again.plan["c2"].params_after
    998
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Optional, Union

from tucker_fx.planning.schema import SchemaError, check_types

__all__ = ["LayerPlan", "Plan", "PLAN_VERSION", "KINDS", "FACTORS", "CAPTURES", "check_plan_data"]

PLAN_VERSION = 1
KINDS = ("tucker2", "tucker1", "svd", "none")
FACTORS = ("weights", "data")
CAPTURES = ("symbolic_trace", "export", "graph_module", "exported_program")


@dataclass
class LayerPlan:
    """What happens to one conv/linear layer.

    ``kind`` is ``tucker2`` (``ranks = (R_s, R_t)``), ``tucker1`` (conv, ``ranks = (R,)``),
    ``svd`` (linear, ``ranks = (R,)``) or ``none`` (left alone; ``reason`` says why).
    Costs are per call of the layer at the example input's shape; params include the bias.
    ``factors`` is ``"weights"`` (fitted to the kernel) or ``"data"`` (fitted to the layer's responses on
    calibration data: ``TuckerConfig(data_aware=True)`` sets it per layer where it measured better).
    With a ``target_*`` the budgeted search fills ``predicted_loss`` (the network's relative output
    error on calibration data with only this layer compressed), ``budget_cost`` (the layer's cost in
    the target's unit: ms, MACs or params, as predicted when allocating) and, for a speed target,
    ``measured_cost`` (the layer's nodes timed in the compressed model, ms).
    """

    name: str
    node: str
    op: str
    kind: str
    ranks: Optional[tuple[int, ...]]
    full_ranks: tuple[int, int]
    rank_source: str = "vbmf"
    functional: bool = False
    as_conv: bool = False
    feature_shape: Optional[tuple[int, ...]] = None
    input_node: Optional[str] = None
    macs_before: int = 0
    params_before: int = 0
    macs_after: int = 0
    params_after: int = 0
    reason: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    weight_error: Optional[float] = None
    lowering: Optional[str] = None
    lowering_source: Optional[str] = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    factors: str = "weights"
    predicted_loss: Optional[float] = None
    budget_cost: Optional[float] = None
    measured_cost: Optional[float] = None

    @property
    def applied(self) -> bool:
        return self.kind != "none"

    @property
    def flops_before(self) -> int:
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        return 2 * self.macs_after

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerPlan":
        """An entry of ``Plan.to_dict()["layers"]``, checked by :func:`check_plan_data`'s rules."""
        _check_entry(data, None, _layer_hints())
        return cls._from_checked(data)

    @classmethod
    def _from_checked(cls, data: dict[str, Any]) -> "LayerPlan":
        return cls(**{k: tuple(v) if k in _INT_LIST_FIELDS and v is not None else v for k, v in data.items()})


_REQUIRED_FIELDS = ("name", "node", "op", "kind", "ranks", "full_ranks")
_INT_LIST_FIELDS = ("ranks", "full_ranks", "feature_shape")


def _layer_hints() -> dict[str, Any]:
    return typing.get_type_hints(LayerPlan)


def _check_entry(data: Any, index: Optional[int], hints: dict[str, Any]) -> None:
    """One plan entry: a JSON object with known fields, the required ones, each of its type."""
    if not isinstance(data, dict):
        raise SchemaError(f"a plan entry must be a JSON object, got {type(data).__name__}: {data!r}")
    known = {f.name for f in fields(LayerPlan)}
    unknown = set(data) - known
    if unknown:
        raise SchemaError(f"unknown plan entry fields {sorted(unknown)}; expected a subset of {sorted(known)}")
    missing = set(_REQUIRED_FIELDS) - set(data)
    if missing:
        raise SchemaError(f"plan entry {data.get('name', '?')!r} lacks the field(s) {sorted(missing)}")
    for key in _INT_LIST_FIELDS:
        value = data.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise SchemaError(f"plan entry {data['name']!r}: {key} must be a list of ints, got {value!r}")
    where = f"plan.layers[{index}] ({data['name']!r})" if index is not None else f"plan entry {data['name']!r}"
    check_types(data, hints, where)
    if data.get("factors", "weights") not in FACTORS:
        raise SchemaError(f"{where}: factors must be one of {FACTORS}, got {data['factors']!r}")


def check_plan_data(data: Any) -> None:
    """Check a plan as JSON gives it (``Plan.to_dict()``'s form): the layout, the version, and every
    entry's fields and their types. The one check of plan data: ``Plan.from_dict`` (so
    ``Plan.load``) and ``tucker_fx.load`` (a save's manifest) both use it. Raises
    :class:`~tucker_fx.planning.schema.SchemaError` (a ``ValueError``) naming the first problem.

    >>> check_plan_data({"version": 1, "layers": [{"name": "fc", "node": "fc", "op": "linear"}]})
    Traceback (most recent call last):
    ...
    tucker_fx.planning.schema.SchemaError: plan entry 'fc' lacks the field(s) ['full_ranks', 'kind', 'ranks']
    """
    if not isinstance(data, dict) or "layers" not in data:
        raise SchemaError("expected a plan dict with 'version' and 'layers'")
    version = data.get("version")
    if version != PLAN_VERSION:
        raise SchemaError(f"plan version {version!r} is not supported; expected {PLAN_VERSION}")
    layers, notes = data["layers"], data.get("notes", [])
    if not isinstance(layers, list):
        raise SchemaError(f"the plan's 'layers' must be a list of entries, got {type(layers).__name__}")
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise SchemaError(f"the plan's 'notes' must be a list of strings, got {notes!r}")
    capture = data.get("capture")
    if capture is not None and capture not in CAPTURES:
        raise SchemaError(f"the plan's 'capture' must be one of {list(CAPTURES)} or null, got {capture!r}")
    hints = _layer_hints()
    for i, entry in enumerate(layers):
        _check_entry(entry, i, hints)


_CAPTURE_TEXT = {
    "symbolic_trace": "torch.fx.symbolic_trace (layers named by module)",
    "export": "torch.export.export(strict=False) (aten graph)",
    "graph_module": "the GraphModule given",
    "exported_program": "the ExportedProgram given",
}


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"


def _ratio(before: int, after: int) -> str:
    return f"x{before / after:.2f}" if after else "-"


@dataclass
class Plan:
    """One :class:`LayerPlan` per candidate layer, in graph order; ``notes`` say what holds for
    the whole model (for one, why nothing was decomposed); ``capture``: how the model was captured."""

    layers: list[LayerPlan]
    version: int = PLAN_VERSION
    notes: list[str] = field(default_factory=list)
    capture: Optional[str] = None
    """How the model was captured: ``"symbolic_trace"``, ``"export"`` (``torch.export``, non-strict),
    ``"graph_module"`` (a GraphModule taken as it is), ``"exported_program"``; ``None``: not recorded.
    Layer names depend on it, so ``apply_plan`` captures the same way."""

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name or layer.node == name:
                return layer
        raise KeyError(f"no layer {name!r} in the plan; layers: {[l.name for l in self.layers]}")

    @property
    def applied(self) -> list[LayerPlan]:
        return [l for l in self.layers if l.applied]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({"version": self.version, "layers": [asdict(l) for l in self.layers],
                                      "notes": list(self.notes), "capture": self.capture}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """The plan of ``to_dict()``'s form, checked by :func:`check_plan_data` (``ValueError``)."""
        check_plan_data(data)
        return cls([LayerPlan._from_checked(l) for l in data["layers"]], version=PLAN_VERSION,
                   notes=list(data.get("notes", [])), capture=data.get("capture"))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a plan: invalid JSON ({exc})") from exc
        return cls.from_dict(data)

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json(indent=2))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Plan":
        with open(path, encoding="utf-8") as f:
            try:
                text = f.read()
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not a plan: not UTF-8 text ({exc})") from exc
        return cls.from_json(text)

    def to_markdown(self) -> str:
        lines = [
            "| layer | op | kind | ranks | params before -> after | MACs before -> after | weight rel. error | lowering | note |",
            "|---|---|---|---|---:|---:|---:|---|---|",
        ]
        budgeted = any(l.predicted_loss is not None for l in self.layers)
        if budgeted:
            lines[0] += " predicted loss | cost (predicted / measured) |"
            lines[1] += "---:|---:|"
        for l in self.layers:
            ranks = ", ".join(map(str, l.ranks)) if l.ranks else "-"
            err = f"{l.weight_error:.3g}" if l.weight_error is not None else ""
            note = "; ".join(([l.reason] if l.reason else []) + l.notes)
            kind = l.kind + (" (as conv)" if l.as_conv else "")
            low = ""
            if l.lowering:
                times = ", ".join(f"{k} {v:.3g}" for k, v in sorted(l.timings_ms.items(), key=lambda kv: kv[1]))
                low = f"{l.lowering} ({l.lowering_source}" + (f"; ms: {times}" if times else "") + ")"
            lines.append(
                f"| {l.name} | {l.op} | {kind} | {ranks} | {l.params_before:,} -> {l.params_after:,} "
                f"({_ratio(l.params_before, l.params_after)}) | {l.macs_before:,} -> {l.macs_after:,} "
                f"({_ratio(l.macs_before, l.macs_after)}) | {err} | {low} | {note} |"
                + (f" {_num(l.predicted_loss)} | {_num(l.budget_cost)} / {_num(l.measured_cost)} |" if budgeted else "")
            )
        if self.notes or self.capture:
            lines.append("")
        if self.capture:
            lines.append(f"Captured with: {_CAPTURE_TEXT.get(self.capture, self.capture)}")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()
