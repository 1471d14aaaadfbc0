"""``torch.compile(model, backend="tucker")``: the whole pipeline on Dynamo's graphs.

Dynamo inlines modules: a conv arrives as ``torch.conv3d(x, w, b, ...)`` with ``w`` a
placeholder whose real value is in ``example_inputs``. The backend lifts every placeholder that
Dynamo bound to a module's parameter or buffer (from the compiled module or through a global)
into an attribute of a fresh GraphModule, named by its qualified path (``layer1.0.conv1.weight``),
and so too plain tensor attributes that a layer uses as its weight. The graph then looks like any
traced graph with functional convs on ``get_attr`` weights; layers are found by
:func:`tucker_fx.analysis.sites.site_of`, and the same analysis, planning, rewrite and lowering
passes run on it; per-layer overrides use the same qualified names (``layer1.0.conv1``). A layer
whose weight is computed in ``forward`` or is a real input stays as it is, with the reason in the
plan. Dynamic sizes (``SymInt`` inputs) are compressed and validated at their hint and stay
inputs. The result goes to ``inner``: inductor (default), ``"eager"`` or ``"aot_eager"``.

Weights are read and decomposed at compile time; Dynamo does not guard on their values, so
later changes to the model's weights are not seen, and training through this backend is not
supported: to fine-tune, ``tucker_fx.compress`` the model and train the result.

Example:
    >>> import torch, torch.nn as nn
    >>> import torch._dynamo
    >>> torch._dynamo.reset()
    >>> net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    >>> reports = []
    >>> fast = torch.compile(net, backend="tucker", options={"rank": 1.0, "only_if_cheaper": False,
    ...                                                        "inner": "eager", "on_report": reports.append})
    >>> x = torch.randn(1, 8, 12, 12)
    >>> bool(torch.allclose(fast(x), net(x), atol=1e-4)), [e.name for e in reports[0].plan.applied]
    (True, ['0', '2'])
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.analysis.sites import Site, site_of
from tucker_fx.config import TuckerConfig
from tucker_fx.errors import ShapePropagationError

__all__ = ["tucker_backend", "BACKEND_OPTIONS", "lift_parameters", "concrete_inputs"]

BACKEND_OPTIONS = ("inner", "on_report")
_INNERS = ("inductor", "eager", "aot_eager")
_ROOT = re.compile(r"^(L|G)\['([^']+)'\]")
_STATE_PART = re.compile(r"\._(?:parameters|buffers)\['([^']+)'\]")
_MODULE_PART = re.compile(r"\._modules\['([^']+)'\]")
_ATTR_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
_ITEM_PART = re.compile(r"\[(\d+)\]|\['([^']+)'\]")


def _parse_source(source_name: str) -> Optional[tuple[str, bool]]:
    """``(qualified name, is_state)`` for a source that is a global or an attribute path from a
    local (``L['self']._modules['stem']._parameters['weight']`` -> ``("stem.weight", True)``,
    ``L['self'].w`` -> ``("w", False)``), else ``None``: an input (``L['x']``), or an item of one
    (``L['xs'][0]``) unless it leads to a parameter or buffer. A local root is dropped (it is the
    compiled module or function); a global root is the first name part (``G['model']...`` ->
    ``model.stem.weight``, ``G['nets']['unet'].w`` -> ``nets.unet.w``)."""
    root = _ROOT.match(source_name)
    if root is None:
        return None
    parts = [root.group(2)] if root.group(1) == "G" else []
    pos, rest, state, indexed = 0, source_name[root.end():], False, False
    while pos < len(rest):
        for pattern in (_STATE_PART, _MODULE_PART, _ATTR_PART, _ITEM_PART):
            m = pattern.match(rest, pos)
            if m is not None:
                state |= pattern is _STATE_PART
                indexed |= pattern is _ITEM_PART
                parts.append(next(g for g in m.groups() if g is not None))
                pos = m.end()
                break
        else:
            return None
    if root.group(1) == "L" and (not rest or (indexed and not state)):  # an input, or an item of one
        return None
    return ".".join(parts), state


def _qualified_name(source_name: str) -> Optional[str]:
    """The qualified name of a parameter or buffer source
    (``L['self']._modules['stem']._parameters['weight']`` -> ``stem.weight``), else ``None``."""
    parsed = _parse_source(source_name)
    return parsed[0] if parsed is not None and parsed[1] else None


def concrete_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """``example_inputs`` with each ``SymInt``/``SymFloat``/``SymBool`` (what Dynamo passes for a
    dynamic size) replaced by its hint, the value of the call being compiled."""
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

    out: list[Any] = []
    for i, value in enumerate(example_inputs):
        if isinstance(value, (torch.SymInt, torch.SymBool)):
            value = guarding_hint_or_throw(value)
        elif isinstance(value, torch.SymFloat):
            hint = value.node.hint
            if hint is None:
                raise ValueError(f"example input {i}: expected a SymFloat with a hint, got {value!r} without one")
            value = float(hint)
        out.append(value)
    return out


def _source_name(node: fx.Node) -> Optional[str]:
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


def _set_nested(root: nn.Module, name: str, value: torch.Tensor) -> bool:
    """Register ``value`` at the dotted ``name`` under ``root``; False if the name is taken."""
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, nn.Module):
            return False
    if hasattr(owner, leaf):
        return False
    if isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)
    return True


def lift_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any],
                    also: frozenset[int] = frozenset()) -> tuple[fx.GraphModule, list[int]]:
    """A new GraphModule whose module-bound placeholders are attributes; the indices of the
    placeholders that remain inputs.

    Lifted: every parameter or buffer (``..._parameters[...]``/``..._buffers[...]`` sources,
    reached from a local or a global), the placeholders of index in ``also`` whose source is a
    global or an attribute path (plain tensor attributes used as weights), and attributes that
    Dynamo passes as 0-d tensors under ``dynamic=True`` (a norm's ``eps``, ``momentum``): their
    ``.item()`` becomes the number, read at compile time like the weights.
    """
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    scalars: dict[fx.Node, Any] = {}
    kept: list[int] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        value = example_inputs[i] if i < len(example_inputs) else None
        grapharg = node.meta.get("grapharg")
        source = _source_name(node)
        parsed = _parse_source(source) if source is not None else None
        if isinstance(value, torch.Tensor) and parsed is not None:
            name, state = parsed
            attribute = _ROOT.sub("", source, count=1) != ""  # not a bare global
            if getattr(grapharg, "pass_arg_as_tensor", False) and value.dim() == 0 and attribute:
                scalars[node] = value.item()
            if state or i in also or node in scalars:
                tensor = value if isinstance(value, nn.Parameter) else value.detach()
                if _set_nested(root, name, tensor):
                    env[node] = graph.get_attr(name)
                    continue
        scalars.pop(node, None)
        env[node] = graph.placeholder(node.target)
        env[node].meta.update(node.meta)
        kept.append(i)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if (node.op == "call_method" and node.target == "item" and len(node.args) == 1
                and node.args[0] in scalars):
            env[node] = scalars[node.args[0]]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.eliminate_dead_code(lambda n: n.op != "get_attr")
    return fx.GraphModule(root, graph, class_name="TuckerDynamoGraph"), kept


def _split_options(options: dict[str, Any]) -> tuple[TuckerConfig, str, Optional[Callable[[Any], None]]]:
    allowed = set(TuckerConfig.field_names()) | set(BACKEND_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for backend='tucker'; expected TuckerConfig fields "
            f"{sorted(TuckerConfig.field_names())} or {list(BACKEND_OPTIONS)}"
        )
    inner = options.get("inner", "inductor")
    if inner not in _INNERS:
        raise ValueError(f"backend='tucker' option inner: expected one of {_INNERS}, got {inner!r}")
    on_report = options.get("on_report")
    if on_report is not None and not callable(on_report):
        raise ValueError(f"backend='tucker' option on_report: expected a callable, got {on_report!r}")
    if options.get("inductor"):
        raise ValueError("backend='tucker' option inductor: the compressed graph goes to `inner` "
                         "(inductor by default); expected inductor=False or no such option, got True")
    fields = {k: v for k, v in options.items() if k not in BACKEND_OPTIONS}
    fields.setdefault("progress", False)
    return TuckerConfig(**fields), inner, on_report


def _find_sites(lifted: fx.GraphModule, inputs: Sequence[Any]) -> list[Site]:
    try:
        propagate_shapes(lifted, inputs)
    except ShapePropagationError as exc:
        numbers = [n.name for n in lifted.graph.nodes
                   if n.op == "placeholder" and getattr(n.meta.get("grapharg"), "pass_arg_as_tensor", False)]
        if not numbers:
            raise
        raise ValueError(
            f"backend='tucker' cannot propagate shapes through this graph: {exc}. Expected Python numbers "
            f"that are module attributes; got number input(s) {numbers} that Dynamo passes as tensors under "
            "dynamic=True. Compile with dynamic=False (Dynamo then specialises the numbers), or pass them as tensors"
        ) from exc
    found = (site_of(n, lifted) for n in lifted.graph.nodes)
    return [s for s in found if s is not None]


def tucker_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
    """The ``torch.compile`` backend. Options: TuckerConfig fields, ``inner``, ``on_report``."""
    from tucker_fx.api import compress

    options = dict(kwargs.pop("options", None) or {})
    options.update(kwargs)
    config, inner, on_report = _split_options(options)
    concrete = concrete_inputs(example_inputs)
    lifted, kept = lift_parameters(gm, concrete)
    sites = _find_sites(lifted, [concrete[i] for i in kept])
    placeholders = [n for n in lifted.graph.nodes if n.op == "placeholder"]
    weights = {n for s in sites for n in (s.weight_node, s.bias_node) if n is not None and n.op == "placeholder"}
    also = frozenset(kept[placeholders.index(n)] for n in weights)
    if also:  # plain tensor attributes and globals used as weights: lift them too, then look again
        lifted, kept = lift_parameters(gm, concrete, also)
        sites = _find_sites(lifted, [concrete[i] for i in kept])
    inputs = [example_inputs[i] for i in kept]
    compressed: fx.GraphModule = lifted
    if sites:
        # a layer whose weight is computed in forward is skipped by the planner, with its reason
        result = compress(lifted, *[concrete[i] for i in kept], config=config)
        compressed = result.module
        if on_report is not None:
            on_report(result)
    if inner == "eager":
        compiled: Callable[..., Any] = compressed.forward
    elif inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        compiled = aot_eager(compressed, list(inputs))
    else:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(compressed, list(inputs))

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in kept])

    return run
