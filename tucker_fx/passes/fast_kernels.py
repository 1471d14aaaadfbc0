"""Graph pass: plain convs that ATen would run far below the machine's speed get a kernel that does not.

A decomposition turns one wide conv into a 1x1 channel map, a narrow core conv and another
1x1 map. On the CPU, ATen runs a batch-1 fp32 Conv3d through mkldnn or through its slow
im2col path by a size heuristic, and both are slow for these shapes (profile of the compressed
3D ResNet-18 at rank 0.25, docs/benchmarks.md): the 16 -> 16 3x3x3 cores ran on
``slow_conv3d_forward`` at a few GFLOP/s and the 1x1x1 maps through mkldnn with layout
reorders. This pass, the last of ``compress`` and of ``lower`` (so the fair baseline gets it
too), replaces

- each 1x1 conv (no padding, one group) by :class:`~tucker_fx.kernels.pointwise.PointwiseConv`,
  a ``matmul`` over channels, where :func:`pointwise_wins` says so;
- each narrow 3x3x3 conv that :func:`narrow_wins` picks by
  :class:`~tucker_fx.kernels.narrow_conv.NarrowConv3d` (the package's native kernel);
- each other 3-d conv that :func:`mkldnn_wins` picks by :class:`~tucker_fx.kernels.pointwise.MkldnnConv`
  (``torch.mkldnn_convolution``).

All are exact. The rules are deterministic functions of the layer's shapes, device and dtype
(measured on this project's 2-core CPUs; see the functions), and of whether the native kernel
builds on this machine, so ``tucker_fx.load`` rebuilds the same graph here; the choices go to the
notes (``gm.meta[NOTES_KEY]``).

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis.shapes import propagate_shapes
    >>> from tucker_fx.passes.fast_kernels import UseFastKernels
    >>> net = nn.Sequential(nn.Conv3d(64, 16, 1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1)).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> x = torch.randn(1, 64, 8, 28, 28)
    >>> propagate_shapes(gm, (x,))
    >>> _ = UseFastKernels()(gm)
    >>> [type(m).__name__ for m in gm.children()]
    ['PointwiseConv', 'ReLU', 'MkldnnConv']
    >>> bool(torch.allclose(gm(x), net(x), atol=1e-4))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, OpCost, conv_macs
from tucker_fx.kernels import native
from tucker_fx.kernels.conv_transpose import PatchConvTranspose, is_patch_conv_transpose
from tucker_fx.kernels.narrow_conv import NarrowConv3d, narrow_eligible
from tucker_fx.kernels.pointwise import MkldnnConv, PointwiseConv, is_pointwise, mkldnn_dtypes, mkldnn_eligible
from tucker_fx.passes.runner import PassResult

__all__ = ["UseFastKernels", "pointwise_wins", "narrow_wins", "mkldnn_wins", "patch_transpose_wins", "fast_conv"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def pointwise_wins(conv: nn.Module, x_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> bool:
    """A 1x1 conv on the CPU with enough positions to amortise a call: the ``matmul`` form wins.

    Measured (2-core CPU, fp32, medians of interleaved runs): x2-4 on every 1x1 conv tried, 2-d and
    3-d, batch 1 to 8, 8 to 512 channels (64 -> 16 on 16x56x56: 0.95 -> 0.44 ms); equal below ~100
    positions, where the call costs more than the arithmetic.
    """
    if not is_pointwise(conv) or device.type != "cpu" or len(x_shape) != conv.weight.dim():
        return False
    return math.prod(x_shape[2:]) >= 128


def narrow_wins(conv: nn.Module, x_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> bool:
    """A narrow 3x3x3 conv (:func:`~tucker_fx.kernels.narrow_conv.narrow_eligible`), float32 on the CPU,
    where the native kernel builds: it ran x1.2-3.9 faster than oneDNN in either layout on every such
    conv measured but 8 -> 8 at 32^3 (1.80 against 1.72 ms on channels-last data; x2 on the usual
    layout), see :data:`~tucker_fx.kernels.narrow_conv.NARROW_CHANNELS`."""
    return (narrow_eligible(conv) and device.type == "cpu" and dtype == torch.float32 and len(x_shape) == 5
            and native.available())


def fast_conv(conv: nn.Module, x_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
              ) -> Optional[tuple[nn.Module, str]]:
    """The kernel module that this pass puts in place of ``conv`` and its kind, or None to keep it."""
    if pointwise_wins(conv, x_shape, device, dtype):
        return PointwiseConv.from_conv(conv), "matmul"
    if narrow_wins(conv, x_shape, device, dtype):
        return NarrowConv3d(conv), "native"
    if mkldnn_wins(conv, x_shape, device, dtype):
        return MkldnnConv(conv), "mkldnn"
    return None


def mkldnn_wins(conv: nn.Module, x_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> bool:
    """A 3-d conv (kernel > 1) on the CPU that ATen would give to ``slow_conv3d``, with few channels.

    ATen uses mkldnn for a Conv3d only when ``N * C_in * D * H`` is large; below that it unfolds
    the input and multiplies skinny matrices (``slow_conv3d_forward``). Measured (2-core CPU, fp32,
    batch 1, 3x3x3): ``torch.mkldnn_convolution`` ran x1.5-9 faster on every such conv tried, from
    16 -> 16 on 16x56x56 (34 -> 3.9 ms) to 256 -> 256 on 4x14x14 (10.0 -> 5.5 ms); where ATen
    already picks mkldnn (and for 2-d convs, which it sends to mkldnn) there is nothing to win.
    """
    if (not mkldnn_eligible(conv) or is_pointwise(conv) or conv.weight.dim() != 5 or device.type != "cpu"
            or dtype not in mkldnn_dtypes() or len(x_shape) != 5):
        return False
    n, c, d, h = x_shape[:4]
    return n * c * d * h <= 20480


def patch_transpose_wins(out_shape: tuple[int, ...], device: torch.device) -> bool:
    """A stride = kernel transposed conv on the CPU with a large output: the product form wins.

    Measured (2-core CPU, one thread, fp32, batch 1, kernel 2): 32 -> 32 on 32^3 -> 64^3 86.9 ->
    45.0 ms, 128 -> 64 on 16^3 26.8 -> 8.0 ms; 256 -> 128 on 8^3 2.5 -> 3.2 ms (lost: small outputs).
    """
    return device.type == "cpu" and math.prod(out_shape) >= 1 << 20


_TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TRANSPOSED_CALLS = {torch.ops.aten.conv_transpose3d.input, torch.ops.aten.conv_transpose2d.input,
                     torch.ops.aten.conv_transpose1d.default, torch.nn.functional.conv_transpose3d,
                     torch.nn.functional.conv_transpose2d, torch.nn.functional.conv_transpose1d}


def _transposed_call(gm: fx.GraphModule, node: fx.Node) -> "PatchConvTranspose | None":
    """The kernel for a ``conv_transpose`` call node whose weight/bias are attributes, if it applies."""
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    w, b = args.get("weight"), args.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and not (
            isinstance(b, fx.Node) and b.op == "get_attr")):
        return None
    weight = gm.get_parameter(str(w.target)) if str(w.target) in dict(gm.named_parameters()) else getattr(
        gm, str(w.target), None)
    if not isinstance(weight, torch.Tensor):
        return None
    bias = None
    if b is not None:
        bias = dict(gm.named_parameters()).get(str(b.target))
        if bias is None:
            bias = dict(gm.named_buffers()).get(str(b.target))
        if bias is None:
            return None
    if not is_patch_conv_transpose(tuple(weight.shape), args.get("stride", 1), args.get("padding", 0),
                                   args.get("output_padding", 0), int(args.get("groups", 1)), args.get("dilation", 1)):
        return None
    return PatchConvTranspose(weight, bias)


@dataclass
class UseFastKernels:
    """Graph pass over a graph with ``tensor_meta``: 1x1 convs as ``matmul``, narrow 3-d convs on mkldnn."""

    name: str = "fast_kernels"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        notes = gm.meta.setdefault(NOTES_KEY, [])
        chosen: dict[str, list[str]] = {"matmul": [], "native": [], "mkldnn": [], "patch": []}
        for node in list(gm.graph.nodes):
            if node.op not in ("call_module", "call_function") or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            out_meta = node.meta.get("tensor_meta")
            if node.op == "call_function":
                if node.target in _TRANSPOSED_CALLS and out_meta is not None:
                    kernel = _transposed_call(gm, node)
                    if kernel is not None and patch_transpose_wins(tuple(out_meta.shape), kernel.weight.device):
                        target = f"{node.name}_patch"
                        gm.add_submodule(target, kernel)
                        with gm.graph.inserting_after(node):
                            new = gm.graph.call_module(target, (node.args[0],))
                        new.meta.update(node.meta)
                        node.replace_all_uses_with(new)
                        gm.graph.erase_node(node)
                        for a in node.args[1:3]:
                            if isinstance(a, fx.Node) and a.op == "get_attr" and not a.users:
                                gm.graph.erase_node(a)
                        chosen["patch"].append(target)
                continue
            conv = gm.get_submodule(str(node.target))
            meta = node.args[0].meta.get("tensor_meta")
            if (type(conv) in _TRANSPOSED_MODULES and out_meta is not None and conv.padding_mode == "zeros"
                    and is_patch_conv_transpose(tuple(conv.weight.shape), conv.stride, conv.padding,
                                                conv.output_padding, conv.groups, conv.dilation)
                    and patch_transpose_wins(tuple(out_meta.shape), conv.weight.device)):
                parent, _, leaf = str(node.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, PatchConvTranspose.from_module(conv))
                chosen["patch"].append(str(node.target))
                continue
            if type(conv) not in _CONVS or meta is None:
                continue
            found = fast_conv(conv, tuple(meta.shape), conv.weight.device, meta.dtype)
            if found is None:
                continue
            new, kind = found
            parent, _, leaf = str(node.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
            chosen[kind].append(str(node.target))
        for kind, names in chosen.items():
            if names:
                how = {"matmul": "1x1 convs as matmul", "native": "narrow 3x3x3 convs on the native kernel",
                       "mkldnn": "narrow 3-d convs on mkldnn",
                       "patch": "stride = kernel transposed convs as matmul + reshuffle"}[kind]
                shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
                notes.append(f"{how}: {shown}")
        if chosen["patch"]:
            gm.recompile()
        return PassResult(gm, any(chosen.values()))


@REGISTRY.register(PointwiseConv)
def _pointwise_cost(ctx: CostContext) -> OpCost:
    assert isinstance(ctx.module, PointwiseConv) and ctx.out_shape is not None
    return OpCost("conv", macs=conv_macs(ctx.out_shape, tuple(ctx.module.weight.shape)))


@REGISTRY.register(PatchConvTranspose)
def _patch_transpose_cost(ctx: CostContext) -> OpCost:
    assert isinstance(ctx.module, PatchConvTranspose) and ctx.in_shapes
    w = ctx.module.weight
    return OpCost("conv", macs=math.prod(ctx.in_shapes[0]) * math.prod(w.shape[1:]))


@REGISTRY.register(MkldnnConv)
def _mkldnn_cost(ctx: CostContext) -> OpCost:
    assert isinstance(ctx.module, MkldnnConv) and ctx.out_shape is not None
    return OpCost("conv", macs=conv_macs(ctx.out_shape, tuple(ctx.module.weight.shape)))
