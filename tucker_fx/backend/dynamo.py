"""``torch.compile(model, backend="tucker")``: the whole pipeline on Dynamo's graphs.

Dynamo inlines modules: a conv arrives as ``torch.conv3d(x, w, b, ...)`` with ``w`` a
placeholder whose real value is in ``example_inputs``. The backend lifts every placeholder that
Dynamo bound to a module's parameter or buffer into an attribute of a fresh GraphModule, named
by its qualified path (``layer1.0.conv1.weight``). The graph then looks like any traced graph
with functional convs on ``get_attr`` weights, and the same analysis, planning, rewrite and
lowering passes run on it; per-layer overrides use the same qualified names (``layer1.0.conv1``).
The result goes to ``inner``: inductor (default), ``"eager"`` or ``"aot_eager"``.

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

from tucker_fx.config import TuckerConfig

__all__ = ["tucker_backend", "BACKEND_OPTIONS", "lift_parameters"]

BACKEND_OPTIONS = ("inner", "on_report")
_INNERS = ("inductor", "eager", "aot_eager")
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


_ROOT = re.compile(r"^L\['[^']+'\]")


def _qualified_name(source_name: str) -> Optional[str]:
    """``L['self']._modules['stem']._parameters['weight']`` -> ``stem.weight`` (the root may be
    ``L['self']`` or ``L['fn']``, as Dynamo names it); ``None`` for a plain input like ``L['x']``."""
    root = _ROOT.match(source_name)
    rest = source_name[root.end():] if root else ""
    if not root or ("._parameters[" not in rest and "._buffers[" not in rest):
        return None
    parts = [next(g for g in m.groups() if g is not None) for m in _SOURCE_PART.finditer(rest)]
    return ".".join(parts) or None


def _set_nested(root: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)


def lift_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """A new GraphModule whose module-bound placeholders are attributes; the indices of the
    placeholders that remain inputs."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kept: list[int] = []
    used: set[str] = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        value = example_inputs[i] if i < len(example_inputs) else None
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", None)
        source = source() if callable(source) else source
        name = _qualified_name(source) if isinstance(source, str) else None
        if isinstance(value, torch.Tensor) and name and name not in used:
            used.add(name)
            tensor = value if isinstance(value, nn.Parameter) else value.detach()
            _set_nested(root, name, tensor)
            env[node] = graph.get_attr(name)
        else:
            env[node] = graph.placeholder(node.target)
            env[node].meta.update(node.meta)
            kept.append(i)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
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
    fields = {k: v for k, v in options.items() if k not in BACKEND_OPTIONS}
    fields.setdefault("progress", False)
    return TuckerConfig(**fields), inner, on_report


def tucker_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
    """The ``torch.compile`` backend. Options: TuckerConfig fields, ``inner``, ``on_report``."""
    from tucker_fx.api import compress

    options = dict(kwargs.pop("options", None) or {})
    options.update(kwargs)
    config, inner, on_report = _split_options(options)
    lifted, kept = lift_parameters(gm, example_inputs)
    inputs = [example_inputs[i] for i in kept]
    has_sites = any(n.op == "call_function" and n.target in _SITE_TARGETS for n in lifted.graph.nodes)
    if has_sites:
        result = compress(lifted, *inputs, config=config)
        compressed: fx.GraphModule = result.module
        if on_report is not None:
            on_report(result)
    else:
        compressed = lifted
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


_SITE_TARGETS = {
    torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.linear,
    torch.ops.aten.convolution.default, torch.ops.aten.linear.default,
}
