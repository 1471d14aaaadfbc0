"""Per-op cost formulas, in a registry keyed by op.

Keys are module classes (matched along the MRO, so subclasses of ``nn.Conv3d`` count),
callables (``F.conv3d``, ``operator.add``, aten overloads and their packets) and method
names (``"method:relu"``). A formula takes a :class:`CostContext` and returns an
:class:`OpCost`. Registering a key twice is an error.

Convention: ``macs`` holds the multiply-accumulates of conv/linear/matmul ops, bias adds
excluded: exactly the scope of ``torch.utils.flop_counter.FlopCounterMode``, which reports
2 x these MACs as FLOPs. Every other op's estimate goes to ``other_flops``.

Example:
    >>> import torch.nn as nn
    >>> from tucker_fx.analysis.cost_registry import conv_macs
    >>> conv_macs(out_shape=(1, 6, 28, 120, 160), weight_shape=(6, 4, 5, 11, 11))
    7805952000
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx.analysis.sites import Site

__all__ = [
    "OpCost",
    "CostContext",
    "CostRegistry",
    "REGISTRY",
    "conv_macs",
    "linear_macs",
    "batched",
    "FREE",
    "ELEMENTWISE",
]

aten = torch.ops.aten

Key = Union[type, Callable[..., Any], str]


@dataclass(frozen=True)
class OpCost:
    """What one node costs. ``kind`` names the family (``conv``, ``linear``, ``matmul``,
    ``elementwise``, ``norm``, ``pool``, ``free``, ...)."""

    kind: str
    macs: int = 0
    other_flops: int = 0


@dataclass(frozen=True)
class CostContext:
    """Everything a formula may read: shapes come from shape propagation."""

    node: fx.Node
    in_shapes: tuple[Optional[tuple[int, ...]], ...]
    out_shape: Optional[tuple[int, ...]]
    module: Optional[nn.Module] = None
    site: Optional[Site] = None

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape) if self.out_shape is not None else 0

    @property
    def in_numel(self) -> int:
        first = next((s for s in self.in_shapes if s is not None), None)
        return math.prod(first) if first is not None else 0


Formula = Callable[[CostContext], OpCost]


class CostRegistry:
    """A table from op keys to cost formulas. Duplicate keys are refused."""

    def __init__(self) -> None:
        self._formulas: dict[Any, Formula] = {}

    def register(self, *keys: Key) -> Callable[[Formula], Formula]:
        """Decorator: register ``formula`` under every key in ``keys``."""

        def deco(formula: Formula) -> Formula:
            for key in keys:
                self.add(key, formula)
            return formula

        return deco

    def add(self, key: Key, formula: Formula) -> None:
        if key in self._formulas:
            raise ValueError(f"a cost formula for {key!r} is registered already")
        self._formulas[key] = formula

    def __contains__(self, key: Any) -> bool:
        return key in self._formulas

    def lookup(self, node: fx.Node, module: Optional[nn.Module]) -> Optional[Formula]:
        """The formula for ``node``, or ``None`` when there is none (the op is unsupported)."""
        if node.op == "call_module" and module is not None:
            for cls in type(module).__mro__:
                if cls in self._formulas:
                    return self._formulas[cls]
            return None
        if node.op == "call_function":
            target = node.target
            if target in self._formulas:
                return self._formulas[target]
            packet = getattr(target, "overloadpacket", None)
            return self._formulas.get(packet) if packet is not None else None
        if node.op == "call_method":
            return self._formulas.get(f"method:{node.target}")
        return None


REGISTRY = CostRegistry()


# --- formulas shared with planning -----------------------------------------------------------

def batched(shape: tuple[int, ...], spatial_dims: int) -> tuple[int, ...]:
    """A conv's input or output shape with its batch dim: ``(C, *spatial)`` becomes ``(1, C, *spatial)``.

    >>> batched((3, 8, 8), 2), batched((2, 3, 8, 8), 2)
    ((1, 3, 8, 8), (2, 3, 8, 8))
    """
    shape = tuple(shape)
    return (1, *shape) if len(shape) == spatial_dims + 1 else shape


def conv_macs(
    out_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    *,
    transposed: bool = False,
    in_shape: Optional[tuple[int, ...]] = None,
) -> int:
    """MACs of a convolution: output positions x kernel volume x (in/groups) x out.

    For a transposed conv the work is per *input* position (FlopCounterMode's convention):
    pass ``in_shape``. Unbatched shapes ``(C, *spatial)``, which torch's convs also take, count
    as a batch of one.
    """
    d = len(weight_shape) - 2
    out_shape = batched(out_shape, d)
    in_shape = batched(in_shape, d) if in_shape is not None else None
    if transposed:
        if in_shape is None:
            raise ValueError("a transposed conv needs in_shape")
        return math.prod(in_shape[:1]) * math.prod(in_shape[2:]) * math.prod(weight_shape)
    batch_positions = out_shape[0] * math.prod(out_shape[2:])
    return batch_positions * math.prod(weight_shape)  # weight = out x in/groups x kernel


def linear_macs(in_shape: tuple[int, ...], out_features: int) -> int:
    """MACs of a linear map applied to the last dim of ``in_shape``."""
    return math.prod(in_shape) * out_features


def _site_cost(ctx: CostContext) -> OpCost:
    site = ctx.site
    if site is None or ctx.out_shape is None:
        raise ValueError(f"no site/shape for {ctx.node.format_node()}")
    if site.op == "linear":
        in_shape = ctx.in_shapes[0]
        assert in_shape is not None
        return OpCost("linear", macs=linear_macs(in_shape, site.out_channels))
    macs = conv_macs(
        ctx.out_shape, site.weight_shape, transposed=site.transposed, in_shape=ctx.in_shapes[0]
    )
    return OpCost("conv_transpose" if site.transposed else "conv", macs=macs)


REGISTRY.register(
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.linear, aten.convolution, aten._convolution, aten.conv1d, aten.conv2d,
    aten.conv3d, aten.linear,
)(_site_cost)


def _matmul_macs(a: tuple[int, ...], b: tuple[int, ...], out: tuple[int, ...]) -> int:
    k = a[-1]
    return math.prod(out) * k if out else k


@REGISTRY.register(torch.matmul, operator.matmul, "method:matmul", aten.matmul, torch.mm,
                   "method:mm", aten.mm, torch.bmm, "method:bmm", aten.bmm)
def _matmul(ctx: CostContext) -> OpCost:
    a, b = ctx.in_shapes[0], ctx.in_shapes[1]
    assert a is not None and b is not None and ctx.out_shape is not None
    return OpCost("matmul", macs=_matmul_macs(a, b, ctx.out_shape))


@REGISTRY.register(torch.addmm, aten.addmm, torch.baddbmm, aten.baddbmm)
def _addmm(ctx: CostContext) -> OpCost:
    a, b = ctx.in_shapes[1], ctx.in_shapes[2]
    assert a is not None and b is not None and ctx.out_shape is not None
    return OpCost("matmul", macs=_matmul_macs(a, b, ctx.out_shape))


@REGISTRY.register(F.scaled_dot_product_attention, aten.scaled_dot_product_attention)
def _sdpa(ctx: CostContext) -> OpCost:
    q, k, v = ctx.in_shapes[0], ctx.in_shapes[1], ctx.in_shapes[2]
    assert q is not None and k is not None and v is not None
    lead = math.prod(q[:-2])
    scores = lead * q[-2] * k[-2] * q[-1]
    mix = lead * q[-2] * k[-2] * v[-1]
    return OpCost("attention", macs=scores + mix, other_flops=3 * lead * q[-2] * k[-2])


# --- ops outside FlopCounterMode's scope: estimates in other_flops -----------------------------

FREE: tuple[Key, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat,
    torch.stack, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.narrow,
    torch.t, torch.movedim, torch.roll, torch.zeros_like, torch.ones_like, torch.zeros,
    torch.ones, torch.arange, torch.empty, torch.full, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.pad, operator.getitem, getattr, "method:view", "method:reshape",
    "method:flatten", "method:permute", "method:transpose", "method:contiguous", "method:size",
    "method:dim", "method:unsqueeze", "method:squeeze", "method:expand", "method:expand_as",
    "method:chunk", "method:split", "method:to", "method:type", "method:float", "method:half",
    "method:double", "method:clone", "method:detach", "method:unbind", "method:repeat",
    "method:view_as", "method:reshape_as", "method:narrow", "method:roll", "method:numel",
    "method:unflatten", "method:movedim", "method:t",
    aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.t, aten.transpose,
    aten.clone, aten.expand, aten.cat, aten.stack, aten.unsqueeze, aten.squeeze, aten.slice,
    aten.select, aten.split, aten.split_with_sizes, aten.flatten, aten.alias, aten.detach,
    aten.dropout, aten.constant_pad_nd, aten._to_copy, aten.unbind, aten.sym_size,
)

ELEMENTWISE: tuple[Key, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.PReLU, nn.Softplus, F.relu, F.relu6,
    F.leaky_relu, F.elu, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.mish, torch.relu,
    torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.clamp, torch.where, torch.maximum,
    torch.minimum, operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.iadd, operator.imul, "method:relu", "method:sigmoid", "method:tanh",
    "method:add", "method:sub", "method:mul", "method:div", "method:add_", "method:mul_",
    "method:clamp", "method:exp", "method:sqrt", "method:neg", "method:pow", "method:abs",
    aten.relu, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.add, aten.sub, aten.mul,
    aten.div, aten.exp, aten.neg, aten.clamp, aten.rsqrt, aten.sqrt, aten.where,
    aten.hardtanh,
)


try:  # torch.export's unlifted modules carry a guard-checking submodule
    from torch.export._unlift import GuardsFn as _GuardsFn

    FREE = FREE + (_GuardsFn,)
except ImportError:  # pragma: no cover - older torch
    pass


@REGISTRY.register(F.interpolate, "method:repeat_interleave", torch.repeat_interleave, aten.upsample_nearest3d,
                   aten.upsample_trilinear3d, aten.upsample_nearest2d, aten.upsample_bilinear2d)
def _resample(ctx: CostContext) -> OpCost:
    return OpCost("resample", other_flops=ctx.out_numel)


@REGISTRY.register(*FREE)
def _free(ctx: CostContext) -> OpCost:
    return OpCost("free")


@REGISTRY.register(*ELEMENTWISE)
def _elementwise(ctx: CostContext) -> OpCost:
    return OpCost("elementwise", other_flops=ctx.out_numel)


@REGISTRY.register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm,
                   aten.batch_norm, aten._native_batch_norm_legit_no_training)
def _batch_norm(ctx: CostContext) -> OpCost:
    return OpCost("norm", other_flops=2 * ctx.in_numel)  # scale and shift per element


@REGISTRY.register(nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                   nn.InstanceNorm3d, nn.RMSNorm, F.layer_norm, F.group_norm, F.instance_norm,
                   F.rms_norm, aten.layer_norm, aten.group_norm, aten.native_layer_norm,
                   aten.native_group_norm)
def _norm(ctx: CostContext) -> OpCost:
    return OpCost("norm", other_flops=5 * ctx.in_numel)  # mean, var, normalise, scale, shift


@REGISTRY.register(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax,
                   "method:softmax", aten.softmax, aten._softmax, aten._log_softmax)
def _softmax(ctx: CostContext) -> OpCost:
    return OpCost("softmax", other_flops=3 * ctx.in_numel)


def _kernel_volume(value: Any, dims: int) -> int:
    if isinstance(value, (tuple, list)):
        return math.prod(int(v) for v in value)
    return int(value) ** dims


def _pool_dims(ctx: CostContext) -> int:
    shape = ctx.out_shape or ()
    return max(len(shape) - 2, 1)


@REGISTRY.register(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AvgPool3d)
def _pool_module(ctx: CostContext) -> OpCost:
    assert ctx.module is not None
    k = _kernel_volume(getattr(ctx.module, "kernel_size"), _pool_dims(ctx))
    return OpCost("pool", other_flops=ctx.out_numel * k)


@REGISTRY.register(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                   F.avg_pool3d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool2d,
                   aten.avg_pool3d, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices)
def _pool_function(ctx: CostContext) -> OpCost:
    kernel = ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs["kernel_size"]
    return OpCost("pool", other_flops=ctx.out_numel * _kernel_volume(kernel, _pool_dims(ctx)))


@REGISTRY.register(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                   aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d, aten.adaptive_avg_pool3d,
                   torch.mean, torch.sum, "method:mean", "method:sum", aten.mean, aten.sum)
def _reduce(ctx: CostContext) -> OpCost:
    return OpCost("reduce", other_flops=ctx.in_numel)

