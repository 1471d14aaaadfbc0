"""The cost analysis pass and its report.

:func:`analyze` traces a model, propagates shapes with fake tensors, and writes a
:class:`NodeCost` into ``node.meta["tucker_fx.cost"]`` of every node (and the node's
:class:`~tucker_fx.analysis.sites.Site` under ``"tucker_fx.site"`` when it applies a
conv/linear weight). The :class:`CostReport` gathers them.

Convention: FLOPs = 2 x MACs of conv/linear/matmul ops, bias adds excluded, exactly as
``torch.utils.flop_counter.FlopCounterMode`` counts. Everything else (norms, pooling,
activations, elementwise) is an estimate kept apart in ``other_flops``.

Example:
    >>> import torch
    >>> import tucker_fx
    >>> from tucker_fx.models import thetis_net, THETIS_INPUT_SHAPE
    >>> report = tucker_fx.analyze(thetis_net(), torch.empty(THETIS_INPUT_SHAPE))
    >>> report.total_params, report.total_flops
    (696428, 15774993744)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.meta import COST_KEY, SITE_KEY
from tucker_fx.analysis.capture import capture, capture_model
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, CostRegistry, OpCost
from tucker_fx.analysis.shapes import propagate_shapes, shape_of
from tucker_fx.analysis.sites import site_of

__all__ = ["NodeCost", "CostReport", "analyze", "annotate_costs", "COST_KEY", "SITE_KEY"]


Shape = tuple[int, ...]


@dataclass(frozen=True)
class NodeCost:
    """The cost record of one graph node (also stored in ``node.meta[COST_KEY]``)."""

    name: str
    target: str
    kind: str
    macs: int
    flops: int
    params: int
    in_shapes: tuple[Optional[Shape], ...]
    out_shape: Optional[Shape]
    other_flops: int = 0
    module: Optional[str] = None  # qualified name of the module the node belongs to

    @property
    def label(self) -> str:
        """How tables name the node: a module's qualified name (``layer1.0.conv1``, as plans name
        layers) for a module call, else the node's name."""
        return self.target if self.module is not None and self.target == self.module else self.name


@dataclass
class CostReport:
    """Per-node costs and totals of one graph. ``total_flops`` = 2 x ``total_macs``.

    ``total_params`` counts every parameter of the model once (``sum(p.numel() for p in
    model.parameters())``), used by the graph or not; ``unused_params`` of them belong to no
    graph node (a module forward does not call), named in ``unused``.
    """

    rows: list[NodeCost]
    total_macs: int
    total_flops: int
    other_flops: int
    total_params: int
    unsupported: list[str] = field(default_factory=list)
    unused_params: int = 0
    unused: list[str] = field(default_factory=list)

    @property
    def used_params(self) -> int:
        """Parameters the graph reaches: ``total_params - unused_params``."""
        return self.total_params - self.unused_params

    def row(self, name: str) -> NodeCost:
        """The row of a node name or a module qualified name."""
        for r in self.rows:
            if r.name == name or (r.module == name and r.kind in ("conv", "linear", "conv_transpose")):
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r.name for r in self.rows]}")

    def by_module(self) -> dict[str, dict[str, int]]:
        """Totals grouped by the top-level module qualified name."""
        groups: dict[str, dict[str, int]] = {}
        for r in self.rows:
            key = r.module or r.name
            g = groups.setdefault(key, {"macs": 0, "flops": 0, "other_flops": 0, "params": 0})
            g["macs"] += r.macs
            g["flops"] += r.flops
            g["other_flops"] += r.other_flops
            g["params"] += r.params
        return groups

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (shapes as lists)."""
        d = asdict(self)
        return json.loads(json.dumps(d))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_markdown(self, *, all_rows: bool = False) -> str:
        """A Markdown table. Without ``all_rows`` only nodes that cost something are shown."""
        head = (
            "| node | kind | in shapes | out shape | params | MACs | FLOPs (2xMAC) | other FLOPs |\n"
            "|---|---|---|---|---:|---:|---:|---:|"
        )
        lines = [head]
        for r in self.rows:
            if not all_rows and not (r.macs or r.params or r.other_flops or r.kind == "unsupported"):
                continue
            ins = ", ".join("x".join(map(str, s)) for s in r.in_shapes if s is not None)
            out = "x".join(map(str, r.out_shape)) if r.out_shape else ""
            lines.append(
                f"| {r.label} | {r.kind} | {ins} | {out} | {r.params:,} | {r.macs:,} | "
                f"{r.flops:,} | {r.other_flops:,} |"
            )
        lines.append(
            f"| **total** | | | | **{self.total_params:,}** | **{self.total_macs:,}** | "
            f"**{self.total_flops:,}** | {self.other_flops:,} |"
        )
        text = "\n".join(lines)
        text += "\n\nFLOPs = 2 x MACs of conv/linear/matmul, bias excluded (FlopCounterMode's convention); other FLOPs are estimates."
        if self.unused:
            text += (f"\nParams include {self.unused_params:,} that no node uses (modules forward does not call): "
                     + ", ".join(self.unused))
        if self.unsupported:
            text += "\nNo cost formula for: " + ", ".join(self.unsupported)
        return text

    def __str__(self) -> str:
        return self.to_markdown()


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None)
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    return f"{mod}.{name}" if mod and not str(name).startswith(str(mod)) else str(name)


def _owner(node: fx.Node) -> Optional[str]:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] or None
    return None


def _param_ids(node: fx.Node, gm: fx.GraphModule, module: Optional[nn.Module]) -> list[nn.Parameter]:
    if module is not None:
        return list(module.parameters())
    params = []
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            obj: Any = gm
            try:
                for part in str(arg.target).split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if isinstance(obj, nn.Parameter):
                params.append(obj)
    return params


def _param_names(module: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Every parameter of ``module`` once, with all its qualified names (tied weights have several)."""
    names: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), (p, []))[1].append(name)
    return list(names.values())


def _graph_params(gm: fx.GraphModule) -> tuple[set[int], set[str]]:
    """Ids and qualified names of the parameters that ``gm``'s graph uses: those of called
    modules and of ``get_attr`` nodes that have users (torch.export's unlifted modules fetch
    every parameter, used or not, with a ``get_attr``)."""
    ids: set[int] = set()
    names: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" or (node.op == "get_attr" and node.users):
            target = str(node.target)
            try:
                obj: Any = gm.get_submodule(target) if node.op == "call_module" else _attr(gm, target)
            except AttributeError:
                continue
            if isinstance(obj, nn.Parameter):
                ids.add(id(obj))
                names.add(target)
            elif isinstance(obj, nn.Module):
                for name, p in obj.named_parameters(remove_duplicate=False):
                    ids.add(id(p))
                    names.add(f"{target}.{name}")
    return ids, names


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _unused_params(gm: fx.GraphModule, model: nn.Module) -> list[tuple[str, int]]:
    """(name, numel) of each parameter of ``model`` that no node of ``gm`` uses.

    A node uses a parameter when it is the same tensor (a capture without copy) or sits at the
    same qualified name (a deep copy); a bare leaf module is traced wrapped as ``Sequential``
    child ``0``, so its names carry that prefix in ``gm``.
    """
    used_ids, used_names = _graph_params(gm)
    wrapped = (model is not gm and not isinstance(model, fx.GraphModule)
               and "0" not in dict(model.named_children()) and isinstance(getattr(gm, "0", None), type(model)))
    unused = []
    for p, names in _param_names(model):
        if id(p) in used_ids or any(n in used_names or (wrapped and f"0.{n}" in used_names) for n in names):
            continue
        unused.append((names[0], p.numel()))
    return unused


def annotate_costs(
    gm: fx.GraphModule, registry: CostRegistry = REGISTRY, *, model: Optional[nn.Module] = None
) -> CostReport:
    """Analysis pass: write :class:`NodeCost` records into ``node.meta`` and report them.

    Needs ``node.meta["tensor_meta"]`` (run :func:`propagate_shapes` first). ``model`` is the
    module ``gm`` was captured from (default ``gm`` itself): the parameter totals count all of
    its parameters, and report those ``gm`` does not hold as unused (``fx.GraphModule`` keeps
    only the submodules and attributes its graph references).
    """
    rows: list[NodeCost] = []
    unsupported: list[str] = []
    seen_params: set[int] = set()
    total_macs = other = 0
    for node in gm.graph.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        in_shapes = tuple(shape_of(a) for a in node.args if shape_of(a) is not None)
        out_shape = shape_of(node)
        site = site_of(node, gm)
        if site is not None:
            node.meta[SITE_KEY] = site
        if node.op in ("placeholder", "output", "get_attr"):
            cost = OpCost({"placeholder": "input", "output": "output", "get_attr": "attr"}[node.op])
        else:
            formula = registry.lookup(node, module)
            if formula is None:
                cost = OpCost("unsupported")
                label = f"{node.name} ({_target_name(node) if node.op != 'call_module' else type(module).__name__})"
                unsupported.append(label)
            else:
                cost = formula(CostContext(node, in_shapes, out_shape, module, site))
        params = 0
        for p in _param_ids(node, gm, module):
            params += p.numel()  # a shared parameter shows on every row that uses it ...
            seen_params.add(id(p))
        record = NodeCost(
            name=node.name, target=_target_name(node), kind=cost.kind, macs=cost.macs,
            flops=2 * cost.macs, params=params, in_shapes=in_shapes, out_shape=out_shape,
            other_flops=cost.other_flops, module=_owner(node),
        )
        node.meta[COST_KEY] = record
        rows.append(record)
        total_macs += cost.macs
        other += cost.other_flops
    # ... but counts once in the total: every parameter of the model, used or not
    source = gm if model is None else model
    total_params = sum(p.numel() for p in source.parameters())
    unused = _unused_params(gm, source)
    return CostReport(rows, total_macs, 2 * total_macs, other, total_params, unsupported,
                      unused_params=sum(n for _, n in unused), unused=[name for name, _ in unused])


def analyze(
    model: nn.Module,
    *example_inputs: Any,
    concrete_args: Optional[dict[str, Any]] = None,
    leaf_modules: Iterable[type] = (),
) -> CostReport:
    """Per-node shapes, MACs, FLOPs and parameters of ``model`` on ``example_inputs``.

    ``model`` is an ``nn.Module`` (captured with ``torch.fx.symbolic_trace``, else with
    ``torch.export.export(strict=False)``, as ``compress`` does), an ``fx.GraphModule`` or an
    ``ExportedProgram``; it is never modified. Inputs may be real or ``meta`` tensors: the
    model's forward is not run (export runs it on fake tensors).

    Example:
        >>> import torch, torch.nn as nn, tucker_fx
        >>> r = tucker_fx.analyze(nn.Conv2d(3, 8, 3), torch.empty(1, 3, 32, 32))
        >>> r.total_macs, r.total_flops, r.total_params
        (194400, 388800, 224)
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"analyze expects a torch.nn.Module, fx.GraphModule or torch.export.ExportedProgram, "
            f"got {type(model).__name__}"
        )
    if not example_inputs:
        raise ValueError("analyze needs example inputs, e.g. analyze(model, torch.empty(1, 3, 224, 224))")
    if concrete_args is None and not tuple(leaf_modules):
        # symbolic_trace, else torch.export; not run against the model (analysis computes nothing)
        gm = capture_model(model, example_inputs, check=False, verb="analyze").gm
    else:
        gm = capture(model, concrete_args=concrete_args, leaf_modules=leaf_modules)
        propagate_shapes(gm, example_inputs)
    return annotate_costs(gm, model=model)
