"""Convs that ATen runs far below the machine's speed, as the products they are.

A 1x1(x1) conv is a matrix product over channels at every position. ATen sends a batch-1 fp32
Conv3d to mkldnn or to its slow im2col path by a size heuristic, and both are slow for the
small channel counts that a decomposition makes (the first/last maps of a Tucker block):
measured on the 2-core CPU, a 64 -> 16 1x1x1 conv on 16x56x56 positions ran ~3x faster as
``matmul``. :class:`PointwiseConv` is that product, in either memory layout, with the conv's
stride (a 1x1 kernel with stride s reads every s-th position). Called with several tensors, it is
the product on their concatenation along channels, without building it: one product per part,
summed into one output (``passes.cat_pointwise`` feeds a U-Net decoder's skip and up-sampled maps
straight to the first factor of the conv after them).

A small-channel core conv (e.g. 16 -> 16, 3x3x3) is sent by the same heuristic to
``slow_conv3d``, which unfolds the input and multiplies skinny matrices; ``torch.mkldnn_convolution``
runs the same conv with mkldnn's direct kernels. :class:`MkldnnConv` calls it on the CPU (float32,
bfloat16) in eager mode, and as the custom op ``tucker_fx::mkldnn_conv`` under ``torch.compile``
(:mod:`tucker_fx.kernels.ops`: inductor would lower a plain conv to the slow call); it is the
ordinary conv elsewhere: on other devices (a module built on the CPU still runs on a GPU), on fake
tensors (shape propagation), and under ``torch.export`` (the graph gets a plain conv, which exports
anywhere).

Both keep the conv's ``weight``/``bias`` as Parameters of the same shapes (a state dict of the
conv loads into them), are exact (the same products in another order), and differentiable.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.pointwise import PointwiseConv
    >>> conv = nn.Conv3d(8, 4, 1, stride=2)
    >>> x = torch.randn(2, 8, 4, 6, 6)
    >>> bool(torch.allclose(PointwiseConv.from_conv(conv)(x), conv(x), atol=1e-6))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from tucker_fx.kernels import native
from tucker_fx.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tucker_fx.*)
from tucker_fx.kernels.workspace import pooled as _pooled, workspace_out

__all__ = ["PointwiseConv", "MixParts", "MkldnnConv", "is_pointwise", "mkldnn_eligible", "mkldnn_dtypes",
           "channels_last_copy", "native_product_wins"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_pointwise(conv: nn.Module) -> bool:
    """A conv that :class:`PointwiseConv` computes exactly: kernel 1, no padding, dilation 1,
    one group, zero padding mode."""
    return (isinstance(conv, _CONVS) and all(k == 1 for k in conv.kernel_size)
            and not isinstance(conv.padding, str) and all(p == 0 for p in conv.padding)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def mkldnn_eligible(conv: nn.Module) -> bool:
    """A conv that ``torch.mkldnn_convolution`` computes exactly: numeric padding with zeros."""
    return (isinstance(conv, _CONVS) and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"
            and torch.backends.mkldnn.is_available())


def mkldnn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes ``torch.mkldnn_convolution`` runs on this CPU: float32, and bfloat16 where the CPU has
    the instructions (avx512bw/vl/dq or avx_ne_convert; without them mkldnn raises, as it did on an
    AMD EPYC without AVX-512)."""
    return _MKLDNN_DTYPES


# asked once, at import: asked while torch.export traces, the query would become a node of the graph
_MKLDNN_DTYPES = ((torch.float32, torch.bfloat16)
                  if torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
                  else (torch.float32,))


def native_product_wins(r: int, c: int, positions: int) -> bool:
    """Whether the native ``W z + b`` (:func:`tucker_fx.kernels.native.pointwise`) beats ``torch.mm``
    for ``r`` -> ``c`` channels over ``positions`` (per sample): one side of 4 channels or fewer, or
    8 inputs or fewer, over at least 8192 positions. ``mm`` runs such thin products on one thread;
    the native kernel splits the positions over torch's threads. Measured at 64^3 on the 2-core AMD
    machine, ms ``mm`` / native on one thread, two threads: 16 -> 4 1.74 / 1.38, 1.58 / 0.68;
    4 -> 16 2.36 / 1.65, 1.10 / 0.81; 32 -> 4 8.84 / 7.65, 8.80 / 3.40; at 32^3 8 -> 32 0.71 / 0.56,
    0.34 / 0.30; where it lost: 32 -> 8 at 32^3 on one thread 0.52 / 0.61, 64 -> 16 at 16^3.

    Example:
        >>> native_product_wins(16, 4, 64 ** 3), native_product_wins(64, 16, 64 ** 3), native_product_wins(16, 4, 16 ** 3)
        (True, False, False)
    """
    return positions >= 8192 and (min(r, c) <= 4 or r <= 8) and r <= native.MAX_CHAIN[1]


def _native_product(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or is_fake(x) or x.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32 or not x.is_contiguous() or x.dim() < 3:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return native_product_wins(w.shape[1], w.shape[0], x[0, 0].numel()) and native.available()


@torch.fx.wrap
def _pointwise(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: tuple[int, ...],
               out: Optional[Tensor] = None, layout: str = "keep") -> Tensor:
    # one node for torch.fx.symbolic_trace: the branches read the input's layout
    fmt = _CHANNELS_LAST.get(x.dim())
    channels_last = fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)
    if any(s != 1 for s in stride):
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    w = weight.reshape(weight.shape[0], c)
    if layout != "keep" and n == 1 and fmt is not None and not torch.compiler.is_compiling() and not is_fake(x):
        # the layout change of a channels-last core, for free (passes.channels_last_cores): the same
        # product with its operands transposed, which BLAS reads as they are
        if layout == "to_channels_last" and x.is_contiguous():
            cols = x.reshape(c, -1)
            y = torch.mm(cols.t(), w.t()) if bias is None else torch.addmm(bias, cols.t(), w.t())  # (P, R)
            return y.view(1, *spatial, w.shape[0]).permute(0, x.dim() - 1, *range(1, x.dim() - 1))
        if layout == "to_contiguous" and channels_last:
            rows = x.permute(0, *range(2, x.dim()), 1).reshape(-1, c)  # (P, c), a view
            target = out.view(w.shape[0], -1) if out is not None else None
            if bias is None:
                y = torch.mm(w, rows.t(), out=target) if target is not None else torch.mm(w, rows.t())
            else:
                y = (torch.addmm(bias.reshape(-1, 1), w, rows.t(), out=target) if target is not None
                     else torch.addmm(bias.reshape(-1, 1), w, rows.t()))
            return y.view(1, w.shape[0], *spatial)
    if channels_last:
        # channels-last: positions x channels is already a matrix; the result keeps the layout
        rows = x.permute(0, *range(2, x.dim()), 1).reshape(-1, c)
        y = F.linear(rows, w, bias).reshape(n, *spatial, w.shape[0])
        return y.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    if x.shape[0] and _native_product(x, w, bias):  # a thin product: split over torch's threads
        return native.pointwise(x, w, bias, out)
    cols = x.reshape(n, c, -1)  # a view for a contiguous input
    if n == 1 and not torch.compiler.is_compiling():
        # (R, C) @ (C, positions): torch.matmul would fold a batched (1, C, P) operand the other way
        # round and copy it transposed (measured: that copy was ~40% of a compressed ResNet3d-18)
        if out is not None:  # a reused buffer (kernels.workspace): no fresh pages to fault in
            rows = out.view(w.shape[0], -1)
            torch.mm(w, cols[0], out=rows) if bias is None else torch.addmm(bias.reshape(-1, 1), w, cols[0], out=rows)
            return out.view(1, w.shape[0], *spatial)
        y = torch.mm(w, cols[0]) if bias is None else torch.addmm(bias.reshape(-1, 1), w, cols[0])
        return y.reshape(1, w.shape[0], *spatial)
    y = torch.bmm(w.unsqueeze(0).expand(n, -1, -1), cols)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1)
    return y.reshape(n, w.shape[0], *spatial)


@torch.fx.wrap
def channels_last_copy(x: Tensor) -> Tensor:
    """``x`` copied into channels_last_3d memory (the same values), for a core conv that mkldnn runs
    faster so (``passes.channels_last_cores``); ``x`` itself unless eager, on the CPU, batch 1 and 5-d.

    Example:
        >>> y = channels_last_copy(torch.randn(1, 4, 3, 5, 6))
        >>> y.is_contiguous(memory_format=torch.channels_last_3d), y.is_contiguous()
        (True, False)
    """
    if (x.dim() != 5 or x.shape[0] != 1 or x.device.type != "cpu" or torch.compiler.is_compiling()
            or is_fake(x)):
        return x
    return x.contiguous(memory_format=torch.channels_last_3d)


class PointwiseConv(nn.Module):
    """A 1x1 conv (1D/2D/3D, any stride, bias or not) as a matrix product over channels."""

    layout: str = "keep"
    """``"keep"`` (the input's layout), or set by ``passes.channels_last_cores`` around a core conv:
    ``"to_channels_last"`` (a contiguous input, a channels-last result: the product with its operands
    transposed) or ``"to_contiguous"`` (a channels-last input, a contiguous result); eager, batch 1,
    on the CPU only."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], stride: tuple[int, ...]) -> None:
        super().__init__()
        if weight.dim() < 3 or any(k != 1 for k in weight.shape[2:]):
            raise ValueError(f"PointwiseConv: expected a weight (out, in, 1, ...), got shape {tuple(weight.shape)}")
        if len(stride) != weight.dim() - 2:
            raise ValueError(f"PointwiseConv: expected {weight.dim() - 2} strides, got {stride}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.stride = tuple(int(s) for s in stride)

    @classmethod
    def from_conv(cls, conv: nn.Module) -> "PointwiseConv":
        """The same map as ``conv`` (which :func:`is_pointwise` accepts), its tensors copied."""
        if not is_pointwise(conv):
            raise ValueError(f"PointwiseConv.from_conv: expected a 1x1 conv without padding or groups, got {conv}")
        return cls(conv.weight, conv.bias, tuple(conv.stride))

    def forward(self, x: Tensor, *more: Tensor) -> Tensor:
        """The product on ``x``, or on ``torch.cat((x, *more), 1)`` when ``more`` are given."""
        out = workspace_out(self, self._out_shape(x, more), x, self.weight, self.bias) if _pooled(self) else None
        if more:
            return _pointwise_parts((x, *more), self.weight, self.bias, self.stride, out)
        return _pointwise(x, self.weight, self.bias, self.stride, out, self.layout)

    def _out_shape(self, x: Tensor, more: tuple[Tensor, ...]) -> tuple[int, ...]:
        spatial = tuple(-(-int(d) // s) for d, s in zip(x.shape[2:], self.stride))
        return (int(x.shape[0]), int(self.weight.shape[0])) + spatial

    def extra_repr(self) -> str:
        layout = "" if self.layout == "keep" else f", layout={self.layout}"
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, stride={self.stride}, bias={self.bias is not None}{layout}"


def _is_channels_last(x: Tensor) -> bool:
    fmt = _CHANNELS_LAST.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


@torch.fx.wrap
def _pointwise_parts(parts: tuple[Tensor, ...], weight: Tensor, bias: Optional[Tensor],
                     stride: tuple[int, ...], out: Optional[Tensor] = None) -> Tensor:
    # the 1x1 conv of torch.cat(parts, 1), summed part by part: the concatenation (a full copy of both
    # maps, measured 40 ms for 2 x 32 x 64^3 of which most is page faults) is never built
    channels = sum(p.shape[1] for p in parts)
    if channels != weight.shape[1]:
        raise ValueError(f"PointwiseConv: the parts have {channels} channels together, the weight expects "
                         f"{weight.shape[1]}")
    if (torch.compiler.is_compiling() or any(_is_channels_last(p) for p in parts)
            or any(p.shape[0] != 1 or p.shape[2:] != parts[0].shape[2:] for p in parts)):
        return _pointwise(torch.cat(parts, 1), weight, bias, stride)  # inductor fuses the cat itself
    if any(s != 1 for s in stride):
        parts = tuple(p[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] for p in parts)
    spatial = parts[0].shape[2:]
    w = weight.reshape(weight.shape[0], channels)
    y: Optional[Tensor] = None
    start = 0
    for p in parts:
        c = p.shape[1]
        wp, cols = w[:, start:start + c], p.reshape(c, -1)
        start += c
        if y is None and out is not None:  # a reused buffer (kernels.workspace)
            y = out.view(w.shape[0], -1)
            torch.mm(wp, cols, out=y) if bias is None else torch.addmm(bias.reshape(-1, 1), wp, cols, out=y)
        elif y is None:
            y = torch.mm(wp, cols) if bias is None else torch.addmm(bias.reshape(-1, 1), wp, cols)
        else:
            y = y.addmm_(wp, cols)  # into the fresh product: the backward of mm needs its inputs, not y
    assert y is not None
    return y.reshape(1, w.shape[0], *spatial)


class MixParts(nn.Module):
    """``parts[keep] + W @ cat(the other parts, channels) (+ b)``: a 1x1 conv over a channel concatenation
    whose block for part ``keep`` is the identity, because that part's channel mix was moved into the
    layer that makes it (``passes.cat_pointwise`` does this for a stride = kernel up-conv).

    Example:
        >>> import torch
        >>> mix = MixParts(torch.randn(4, 3, 1, 1), None, keep=0)
        >>> a, b = torch.randn(1, 4, 5, 5), torch.randn(1, 3, 5, 5)
        >>> ref = a + torch.nn.functional.conv2d(b, mix.weight)
        >>> bool(torch.allclose(mix(a, b), ref, atol=1e-5))
        True
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], keep: int) -> None:
        super().__init__()
        if weight.dim() < 3 or any(k != 1 for k in weight.shape[2:]):
            raise ValueError(f"MixParts: expected a weight (out, in, 1, ...), got shape {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.keep = int(keep)

    def forward(self, *parts: Tensor) -> Tensor:
        if not 0 <= self.keep < len(parts) or len(parts) < 2:
            raise ValueError(f"MixParts: expected at least 2 parts with part {self.keep} kept, got {len(parts)}")
        base = parts[self.keep]
        others = tuple(p for i, p in enumerate(parts) if i != self.keep)
        if base.shape[1] != self.weight.shape[0]:
            raise ValueError(f"MixParts: part {self.keep} has {base.shape[1]} channels, the output {self.weight.shape[0]}")
        ones = (1,) * (self.weight.dim() - 2)
        out = workspace_out(self, tuple(base.shape), base, self.weight, self.bias) if _pooled(self) else None
        mixed = (_pointwise_parts(others, self.weight, self.bias, ones, out) if len(others) > 1
                 else _pointwise(others[0], self.weight, self.bias, ones, out))
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or mixed.shape != base.shape:
            return base + mixed
        return mixed.add_(base)  # into the fresh product

    def extra_repr(self) -> str:
        return f"keep part {self.keep}, {self.weight.shape[1]} -> {self.weight.shape[0]}, bias={self.bias is not None}"


@torch.fx.wrap
def _mkldnn_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: tuple[int, ...],
                 padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Tensor:
    eligible = x.device.type == "cpu" and x.dtype in mkldnn_dtypes() and x.dim() == weight.dim()
    if torch.compiler.is_compiling():
        if eligible and not torch.compiler.is_exporting():
            # torch.compile: an opaque op that inductor calls as is (its own lowering of this conv is ATen's slow one)
            return torch.ops.tucker_fx.mkldnn_conv(x, weight, bias, list(stride), list(padding), list(dilation), groups)
    elif eligible and not is_fake(x):
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    # fake tensors (shape propagation), torch.export (a plain conv in the graph: portable), other
    # devices and dtypes
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return conv(x, weight, bias, stride, padding, dilation, groups)


class MkldnnConv(nn.Module):
    """A conv run by ``torch.mkldnn_convolution`` on the CPU (float32; bfloat16 where the CPU supports it:
    :func:`mkldnn_dtypes`), else by ``F.convNd``."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        if not mkldnn_eligible(conv):
            raise ValueError(f"MkldnnConv: expected a Conv1d/2d/3d with numeric zero padding, got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=conv.weight.requires_grad)
        b = conv.bias
        self.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups

    def forward(self, x: Tensor) -> Tensor:
        return _mkldnn_conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"{w.shape[1] * self.groups}, {w.shape[0]}, kernel_size={tuple(w.shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")
