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

from tucker_fx.analysis.shapes import shape_of
from tucker_fx.analysis.sites import Site

__all__ = [
    "OpCost",
    "CostContext",
    "CostRegistry",
    "REGISTRY",
    "conv_macs",
    "linear_macs",
    "einsum_macs",
    "sdpa_macs",
    "mha_macs",
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


def _shape_arg(node: fx.Node, index: int, name: str) -> tuple[int, ...]:
    """The propagated shape of argument ``index`` (or keyword ``name``) of ``node``."""
    arg = node.args[index] if len(node.args) > index else node.kwargs.get(name)
    shape = shape_of(arg)
    if shape is None:
        raise ValueError(f"expected a tensor with a propagated shape as argument {name!r} of "
                         f"{node.format_node()}, got {arg!r}")
    return shape


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
    aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d, aten.linear,
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


@REGISTRY.register(torch.mv, "method:mv", aten.mv, torch.dot, "method:dot", aten.dot)
def _matvec(ctx: CostContext) -> OpCost:
    """Matrix-vector and dot products: their multiply-adds (FlopCounterMode has no formula for
    ``aten.mv``/``aten.dot`` and reports 0; see docs/analysis.md)."""
    a = _shape_arg(ctx.node, 0, "input")
    return OpCost("matmul", macs=math.prod(a))


def sdpa_macs(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> int:
    """MACs of attention's two matmuls, ``Q K^T`` and ``softmax(.) V``: half of FlopCounterMode's
    ``sdpa_flop_count`` (GQA included: the query's heads count).

    >>> sdpa_macs((1, 2, 5, 4), (1, 2, 7, 4), (1, 2, 7, 3))
    490
    """
    lead = math.prod(q[:-2])
    return lead * q[-2] * k[-2] * (q[-1] + v[-1])


@REGISTRY.register(F.scaled_dot_product_attention, aten.scaled_dot_product_attention,
                   aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
                   aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
                   aten._scaled_dot_product_attention_math)
def _sdpa(ctx: CostContext) -> OpCost:
    """Counted as its two matmuls on every device (FlopCounterMode's CUDA count; on CPU it
    reports 0, see docs/analysis.md); the softmax is an estimate in ``other_flops``."""
    q, k, v = (_shape_arg(ctx.node, i, name) for i, name in enumerate(("query", "key", "value")))
    lead = math.prod(q[:-2])
    return OpCost("attention", macs=sdpa_macs(q, k, v), other_flops=3 * lead * q[-2] * k[-2])


def _mha_dims(shape: tuple[int, ...], batch_first: bool) -> tuple[int, int]:
    """(batch, sequence length) of a MultiheadAttention input (unbatched inputs are 2-D)."""
    if len(shape) == 2:
        return 1, shape[0]
    return (shape[0], shape[1]) if batch_first else (shape[1], shape[0])


def mha_macs(n: int, l: int, s: int, e: int, kdim: int, vdim: int, extra_keys: int = 0) -> int:
    """MACs of multi-head attention: the q/k/v projections, ``Q K^T``, ``softmax(.) V`` and the
    output projection (``n`` batch, ``l`` queries, ``s`` keys, ``e`` embed dim; ``extra_keys``
    appended after the projections: ``add_bias_kv``, ``add_zero_attn``).

    >>> mha_macs(1, 5, 5, 8, 8, 8)
    1680
    """
    return n * (l * e * e + s * kdim * e + s * vdim * e + 2 * l * (s + extra_keys) * e + l * e * e)


@REGISTRY.register(nn.MultiheadAttention)
def _mha_module(ctx: CostContext) -> OpCost:
    """``nn.MultiheadAttention`` kept whole (a leaf of symbolic_trace)."""
    mod = ctx.module
    if not isinstance(mod, nn.MultiheadAttention):
        raise TypeError(f"expected nn.MultiheadAttention at {ctx.node.format_node()}, got {type(mod).__name__}")
    q, k = _shape_arg(ctx.node, 0, "query"), _shape_arg(ctx.node, 1, "key")
    n, l = _mha_dims(q, mod.batch_first)
    s = _mha_dims(k, mod.batch_first)[1]
    extra = int(mod.bias_k is not None) + int(mod.add_zero_attn)
    macs = mha_macs(n, l, s, mod.embed_dim, mod.kdim, mod.vdim, extra)
    return OpCost("attention", macs=macs, other_flops=3 * n * mod.num_heads * l * (s + extra))


@REGISTRY.register(torch._native_multi_head_attention, aten._native_multi_head_attention)
def _native_mha(ctx: CostContext) -> OpCost:
    """The fused op of MultiheadAttention's inference fast path: (query, key, value, embed_dim,
    num_heads, ...), batch first."""
    q, k = _shape_arg(ctx.node, 0, "query"), _shape_arg(ctx.node, 1, "key")
    e, heads = int(ctx.node.args[3]), int(ctx.node.args[4])
    n, l = _mha_dims(q, True)
    s = _mha_dims(k, True)[1]
    return OpCost("attention", macs=mha_macs(n, l, s, e, e, e), other_flops=3 * n * heads * l * s)


# --- einsum: the pairwise contractions torch performs ------------------------------------------

_Label = Union[str, tuple[str, int]]


def _einsum_terms(equation: str, shapes: list[tuple[int, ...]]) -> tuple[list[dict[_Label, int]], set[_Label]]:
    """Each operand as {label: size} (ellipsis dims as ``("...", i)``, counted from the right so
    they broadcast), and the output's labels (explicit, or implicit: labels seen once, and ...)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum {equation!r}: expected {len(terms)} operands, got {len(shapes)} shapes")
    ops: list[dict[_Label, int]] = []
    seen: dict[_Label, int] = {}
    ellipsis: set[_Label] = set()
    for term, shape in zip(terms, shapes):
        letters = term.replace("...", "")
        n_ell = len(shape) - len(letters)
        labels: list[_Label] = []
        for part_index, part in enumerate(term.split("...")):
            if part_index == 1:
                labels += [("...", n_ell - i) for i in range(n_ell)]
            labels += list(part)
        sizes: dict[_Label, int] = {}
        for label, size in zip(labels, shape):
            sizes[label] = max(sizes.get(label, 1), int(size))  # a repeated label: its diagonal
            if isinstance(label, tuple):
                ellipsis.add(label)
            else:
                seen[label] = seen.get(label, 0) + 1
        ops.append(sizes)
    if arrow:
        out: set[_Label] = set(rhs.replace("...", "")) | (ellipsis if "..." in rhs else set())
    else:
        out = {label for label, count in seen.items() if count == 1} | ellipsis
    return ops, out


def einsum_macs(equation: str, shapes: list[tuple[int, ...]], path: Optional[list[int]] = None) -> int:
    """MACs of ``torch.einsum(equation, *operands of these shapes)``, contraction by contraction
    as ATen does it: an index that only one operand holds (and the output does not) is summed
    out first; a pair that shares a contracted index is a ``bmm`` costing the product of the
    sizes of all its indices; a pair that shares none is a ``mul`` (no MACs, as FlopCounterMode).
    Operands are contracted left to right, or in the pairs of ``path`` (opt_einsum's format,
    flattened: what ``torch.einsum`` passes when opt_einsum is installed and enabled).

    >>> einsum_macs("bhid,bhjd->bhij", [(1, 2, 5, 4), (1, 2, 6, 4)])
    240
    >>> einsum_macs("i,j->ij", [(3,), (4,)])
    0
    """
    ops, out = _einsum_terms(equation, shapes)
    if len(ops) < 2:
        return 0
    contracted = {label for op in ops for label in op} - out
    holders = {label: sum(op.get(label, 1) != 1 for op in ops) for label in contracted}
    pairs = [(path[i], path[i + 1]) for i in range(0, len(path), 2)] if path else None
    macs = 0
    while len(ops) > 1:
        i, j = sorted(pairs.pop(0)) if pairs else (0, 1)
        a, b = ops[i], ops[j]
        del ops[j], ops[i]
        contract_now: set[_Label] = set()
        for label in contracted:
            sa, sb = a.get(label, 1), b.get(label, 1)
            if sa != 1 and sb != 1:
                holders[label] -= 1
                if holders[label] == 1:  # no other operand holds it: contracted by this bmm
                    contract_now.add(label)
                    holders[label] = 0
            elif holders[label] == 1 and (sa != 1 or sb != 1):  # only one of the two: summed out first
                holders[label] = 0
                a.pop(label, None)
                b.pop(label, None)
        merged = {label: max(a.get(label, 1), b.get(label, 1)) for label in {*a, *b}}
        if contract_now:  # a bmm of (shared, left-only, contracted) x (shared, contracted, right-only)
            macs += math.prod(merged.values())
        result = {label: size for label, size in merged.items() if label not in contract_now}
        if pairs is None:
            ops.insert(0, result)
        else:
            ops.append(result)
    return macs


def _einsum_args(node: fx.Node) -> tuple[str, list[Any], Optional[list[int]]]:
    """(equation, operand nodes, path) of a ``torch.einsum`` or ``aten.einsum`` node, the
    sublist format (``einsum(a, [0, 1], b, [1, 2], [0, 2])``) turned into an equation."""
    args = list(node.args)
    if isinstance(args[0], str):
        if len(args) >= 2 and isinstance(args[1], (list, tuple)):  # einsum(eq, [ops]), aten.einsum(eq, ops, path)
            path = args[2] if len(args) > 2 else node.kwargs.get("path")
            return args[0], list(args[1]), list(path) if path else None
        return args[0], args[1:], None

    def letters(sub: Any) -> str:
        return "".join("..." if s is Ellipsis else chr(ord("a") + int(s)) if int(s) < 26
                       else chr(ord("A") + int(s) - 26) for s in sub)

    operands, terms = args[0::2], [letters(sub) for sub in args[1::2]]
    output = None
    if len(operands) > len(terms):  # a trailing output sublist
        output, operands = letters(operands[-1]), operands[:-1]
    return ",".join(terms) + (f"->{output}" if output is not None else ""), operands, None


def _opt_einsum_path(equation: str, shapes: list[tuple[int, ...]]) -> Optional[list[int]]:
    """The path ``torch.einsum`` itself would take for a traced call (None: left to right)."""
    if len(shapes) < 3 or not (torch.backends.opt_einsum.is_available() and torch.backends.opt_einsum.enabled):
        return None
    opt_einsum = torch.backends.opt_einsum.get_opt_einsum()
    pairs = opt_einsum.contract_path(equation, *shapes, shapes=True,
                                     optimize=torch.backends.opt_einsum.strategy)[0]
    return [i for pair in pairs for i in pair]


@REGISTRY.register(torch.einsum, aten.einsum)
def _einsum(ctx: CostContext) -> OpCost:
    equation, operands, path = _einsum_args(ctx.node)
    shapes = []
    for i, operand in enumerate(operands):
        shape = shape_of(operand)
        if shape is None:
            raise ValueError(f"einsum operand {i} of {ctx.node.format_node()} has no propagated shape; "
                             "expected shape propagation to have run")
        shapes.append(shape)
    if path is None and ctx.node.target is torch.einsum:
        path = _opt_einsum_path(equation, shapes)
    return OpCost("einsum", macs=einsum_macs(equation, shapes, path), other_flops=ctx.out_numel)


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
    aten.contiguous, aten._assert_tensor_metadata, aten.lift_fresh_copy, aten.to, aten.zeros,
    aten.ones, aten.full, aten.empty, aten.new_zeros, aten.new_ones, aten.new_empty, aten.repeat,
    aten.unflatten, aten.pad, aten.fill_, aten.index, aten.expand_as, aten.arange, aten.zeros_like,
    aten.ones_like, aten.roll, aten.copy_, aten.scalar_tensor,
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
    aten.hardtanh, aten.add_, aten.mul_, aten.sub_, aten.div_, aten.relu_, aten.leaky_relu,
    aten.leaky_relu_, aten.prelu, aten._prelu_kernel, aten.elu, aten.hardswish, aten.softplus,
    aten.mish, aten.pow, aten.abs, aten.log, aten.erf, aten.hardtanh_, aten.silu_, aten.sigmoid_,
    aten.tanh_, aten.clamp_min, aten.clamp_max, aten.minimum, aten.maximum, aten.eq, aten.ne,
    aten.lt, aten.gt, aten.le, aten.ge, aten.logical_not, aten.masked_fill,
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
                   aten.native_group_norm, aten.instance_norm, aten.rms_norm)
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

