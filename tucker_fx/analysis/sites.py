"""One view of a convolution or linear layer, whatever spelling the graph uses.

A *site* is a node that applies a weight tensor: ``call_module`` on ``nn.ConvNd`` /
``nn.Linear``, ``call_function`` on ``F.conv3d`` / ``torch.conv3d`` / ``F.linear``, or the
aten overloads seen under ``torch.export`` (``aten.convolution``, ``aten.conv3d``,
``aten.linear``, ``aten.conv_transpose3d``). Everything downstream (cost formulas, planning,
rewriting) reads a :class:`Site` and never looks at the spelling again.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis.sites import site_of
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2)))
    >>> node = [n for n in gm.graph.nodes if n.op == "call_module"][0]
    >>> site = site_of(node, gm)
    >>> site.op, site.spatial_dims, site.stride, tuple(site.weight_shape)
    ('conv', 2, (2, 2), (8, 3, 3, 3))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Site", "site_of", "resolve_tensor", "PaddingT"]

aten = torch.ops.aten

PaddingT = Union[tuple[int, ...], str]


@dataclass(frozen=True)
class Site:
    """A conv/linear application, normalised.

    ``weight_shape`` is ``(out, in/groups, *kernel)`` for a conv (``(in, out/groups, *kernel)``
    when ``transposed``) and ``(out, in)`` for a linear. ``spatial_dims`` is 0 for a linear.
    """

    node: fx.Node
    op: str  # "conv" | "linear"
    spatial_dims: int
    weight_shape: tuple[int, ...]
    has_bias: bool
    stride: tuple[int, ...] = ()
    padding: PaddingT = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    module_name: Optional[str] = None  # qualified name for call_module sites
    weight_node: Optional[fx.Node] = None  # the node that provides the weight (functional sites)
    bias_node: Optional[fx.Node] = None

    @property
    def in_channels(self) -> int:
        w = self.weight_shape
        if self.op == "linear":
            return w[1]
        return w[0] if self.transposed else w[1] * self.groups

    @property
    def out_channels(self) -> int:
        w = self.weight_shape
        if self.op == "linear":
            return w[0]
        return w[1] * self.groups if self.transposed else w[0]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def display_name(self) -> str:
        """Qualified module name for module sites; for a functional site whose weight is an
        attribute ``a.b.weight``, ``a.b`` (how Dynamo and torch.export graphs name layers);
        else the node name."""
        if self.module_name is not None:
            return self.module_name
        w = self.weight_node
        if w is not None and w.op == "get_attr" and str(w.target).endswith(".weight"):
            return str(w.target)[: -len(".weight")]
        return self.node.name

    def unreadable_reason(self) -> Optional[str]:
        """Why this site's weight or bias cannot be read before running the model (a graph
        input, or a tensor computed in ``forward``), or ``None`` when it can."""
        if self.module_name is not None:
            return None
        for role, node in (("weight", self.weight_node), ("bias", self.bias_node)):
            if node is None or node.op == "get_attr":
                continue
            what = "a graph input" if node.op == "placeholder" else f"computed in forward (node {node.name!r})"
            return (f"its {role} is {what}, not a parameter, buffer or tensor attribute that can be read "
                    "before the model runs: not decomposed")
        return None

    def weight(self, gm: fx.GraphModule) -> torch.Tensor:
        """The weight tensor itself (a Parameter for module and ``get_attr`` sites)."""
        if self.module_name is not None:
            return gm.get_submodule(self.module_name).weight
        return resolve_tensor(self.weight_node, gm)

    def bias(self, gm: fx.GraphModule) -> Optional[torch.Tensor]:
        if not self.has_bias:
            return None
        if self.module_name is not None:
            return gm.get_submodule(self.module_name).bias
        return resolve_tensor(self.bias_node, gm)


def resolve_tensor(node: Optional[fx.Node], gm: fx.GraphModule) -> torch.Tensor:
    """The tensor a ``get_attr`` node stands for."""
    if node is None:
        raise ValueError("expected a node that provides a tensor, got None")
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"expected a tensor at {node.target!r}, got {type(obj).__name__}")
        return obj
    raise ValueError(
        f"cannot read the weight of this site: it comes from {node.format_node()}, "
        "which is not a module attribute (a parameter, buffer or tensor attribute)"
    )


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and n > 1:
            return tuple(int(value[0]) for _ in range(n))
        return tuple(int(v) for v in value)
    return tuple(int(value) for _ in range(n))


def _meta_shape(arg: Any) -> Optional[tuple[int, ...]]:
    if isinstance(arg, fx.Node):
        tm = arg.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape_of_weight(node: fx.Node, gm: fx.GraphModule, weight_arg: Any) -> tuple[int, ...]:
    shape = _meta_shape(weight_arg)
    if shape is None and isinstance(weight_arg, fx.Node) and weight_arg.op == "get_attr":
        shape = tuple(resolve_tensor(weight_arg, gm).shape)
    if shape is None:
        raise ValueError(
            f"the weight shape of {node.format_node()} is unknown: run shape propagation first"
        )
    return shape


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FUNCTIONAL_CONV: dict[Any, int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_FUNCTIONAL_CONVT: dict[Any, int] = {  # same argument order in F.* and in the aten overloads
    F.conv_transpose1d: 1,
    F.conv_transpose2d: 2,
    F.conv_transpose3d: 3,
    aten.conv_transpose1d.default: 1,  # torch.export spells nn.ConvTranspose*d with these
    aten.conv_transpose2d.input: 2,
    aten.conv_transpose3d.input: 3,
}
_ATEN_CONV: dict[Any, int] = {
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
}
_LINEAR_FUNCTIONS = (F.linear, aten.linear.default)


def _module_site(node: fx.Node, gm: fx.GraphModule) -> Optional[Site]:
    mod = gm.get_submodule(str(node.target))
    if isinstance(mod, nn.Linear):
        return Site(
            node=node, op="linear", spatial_dims=0, weight_shape=tuple(mod.weight.shape),
            has_bias=mod.bias is not None, module_name=str(node.target),
        )
    if isinstance(mod, _CONV_MODULES + _CONVT_MODULES):
        d = len(mod.kernel_size)
        transposed = isinstance(mod, _CONVT_MODULES)
        padding = mod.padding if isinstance(mod.padding, str) else _ntuple(mod.padding, d)
        return Site(
            node=node, op="conv", spatial_dims=d, weight_shape=tuple(mod.weight.shape),
            has_bias=mod.bias is not None, stride=_ntuple(mod.stride, d), padding=padding,
            dilation=_ntuple(mod.dilation, d), groups=int(mod.groups),
            padding_mode=str(mod.padding_mode), transposed=transposed,
            output_padding=_ntuple(mod.output_padding, d) if transposed else (0,) * d,
            module_name=str(node.target),
        )
    return None


_SITE_OVERLOADS = (*_FUNCTIONAL_CONVT, *_ATEN_CONV, *_LINEAR_FUNCTIONS, aten.convolution.default,
                   aten._convolution.default)


def _overload(target: Any) -> Any:
    """An aten op packet called directly (``torch.ops.aten.convolution(...)`` in a traced forward)
    as the overload the site tables know; any other target unchanged."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        for overload in _SITE_OVERLOADS:
            if getattr(overload, "overloadpacket", None) is target:
                return overload
    return target


def _function_site(node: fx.Node, gm: fx.GraphModule) -> Optional[Site]:
    target = _overload(node.target)
    if target in _LINEAR_FUNCTIONS:
        w = _arg(node, 1, "weight", None)
        b = _arg(node, 2, "bias", None)
        return Site(
            node=node, op="linear", spatial_dims=0, weight_shape=_shape_of_weight(node, gm, w),
            has_bias=b is not None, weight_node=w if isinstance(w, fx.Node) else None,
            bias_node=b if isinstance(b, fx.Node) else None,
        )
    if target in _FUNCTIONAL_CONV or target in _ATEN_CONV:
        d = _FUNCTIONAL_CONV.get(target) or _ATEN_CONV[target]
        w, b = _arg(node, 1, "weight", None), _arg(node, 2, "bias", None)
        padding = _arg(node, 4, "padding", 0)
        return Site(
            node=node, op="conv", spatial_dims=d, weight_shape=_shape_of_weight(node, gm, w),
            has_bias=b is not None, stride=_ntuple(_arg(node, 3, "stride", 1), d),
            padding=padding if isinstance(padding, str) else _ntuple(padding, d),
            dilation=_ntuple(_arg(node, 5, "dilation", 1), d),
            groups=int(_arg(node, 6, "groups", 1)),
            weight_node=w if isinstance(w, fx.Node) else None,
            bias_node=b if isinstance(b, fx.Node) else None,
        )
    if target in _FUNCTIONAL_CONVT:
        d = _FUNCTIONAL_CONVT[target]
        w, b = _arg(node, 1, "weight", None), _arg(node, 2, "bias", None)
        return Site(
            node=node, op="conv", spatial_dims=d, weight_shape=_shape_of_weight(node, gm, w),
            has_bias=b is not None, stride=_ntuple(_arg(node, 3, "stride", 1), d),
            padding=_ntuple(_arg(node, 4, "padding", 0), d),
            output_padding=_ntuple(_arg(node, 5, "output_padding", 0), d),
            groups=int(_arg(node, 6, "groups", 1)),
            dilation=_ntuple(_arg(node, 7, "dilation", 1), d), transposed=True,
            weight_node=w if isinstance(w, fx.Node) else None,
            bias_node=b if isinstance(b, fx.Node) else None,
        )
    if target in (aten.convolution.default, aten._convolution.default):
        w, b = node.args[1], node.args[2]
        shape = _shape_of_weight(node, gm, w)
        d = len(shape) - 2
        transposed = bool(node.args[6])
        return Site(
            node=node, op="conv", spatial_dims=d, weight_shape=shape, has_bias=b is not None,
            stride=_ntuple(node.args[3], d), padding=_ntuple(node.args[4], d),
            dilation=_ntuple(node.args[5], d), transposed=transposed,
            output_padding=_ntuple(node.args[7], d), groups=int(node.args[8]),
            weight_node=w if isinstance(w, fx.Node) else None,
            bias_node=b if isinstance(b, fx.Node) else None,
        )
    return None


_SITE_FINDERS: dict[str, Callable[[fx.Node, fx.GraphModule], Optional[Site]]] = {
    "call_module": _module_site,
    "call_function": _function_site,
}


def site_of(node: fx.Node, gm: fx.GraphModule) -> Optional[Site]:
    """The :class:`Site` of ``node`` if it applies a conv/linear weight, else ``None``.

    Functional and aten spellings need shape propagation to have run (the weight's shape
    is read from ``node.meta``) unless the weight comes from a ``get_attr``.
    """
    finder = _SITE_FINDERS.get(node.op)
    return finder(node, gm) if finder is not None else None
