"""A widening 1x1 product, its activation and a narrowing 1x1 product, without the wide map.

In a decomposed ``conv -> [norm] -> act -> conv`` (the unit of most 3-D CNNs) the first conv's
last factor widens R1 channels to the layer's C, the norm and the activation read and write that
full-width map, and the second conv's first factor narrows it to R2 again. Per position this is
``W2 act(W1 z + b1) + b2``, two small matrix products around an elementwise function; a norm
computed from the narrow side (:class:`~tucker_fx.kernels.norm_fold.NormedPointwise`) only changes
``W1`` and ``b1``. :class:`PointwiseChain` computes it on the native kernel
(:func:`tucker_fx.kernels.native.pointwise_chain`), 16 positions at a time, the C-channel
intermediate in L1: measured one thread, 4 -> 16 -> 4 channels with a ReLU at 64^3 1.9 ms against
5.9 ms for ``addmm``, ``relu_`` and ``addmm``; 8 -> 32 -> 8 with a LeakyReLU 6.9 against 53.3 ms
(the 32 MB map's page faults). A channels-last input (a core conv that ``channels_last_cores``
runs so) is copied to the usual layout first. Elsewhere (no native library, other dtypes,
``torch.compile`` and ``torch.export``, gradients) it calls its three modules in turn: the same
function, the same parameters.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.pointwise import PointwiseConv
    >>> from tucker_fx.kernels.pointwise_chain import PointwiseChain
    >>> up, act, down = PointwiseConv.from_conv(nn.Conv3d(4, 16, 1)), nn.ReLU(), PointwiseConv.from_conv(nn.Conv3d(16, 4, 1))
    >>> z = torch.randn(1, 4, 6, 7, 9)
    >>> bool(torch.allclose(PointwiseChain(up, act, down)(z), down(act(up(z))), atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from tucker_fx.kernels import native
from tucker_fx.kernels.norm_fold import NormedPointwise, foldable_norm
from tucker_fx.kernels.pointwise import PointwiseConv
from tucker_fx.kernels.resample import SeparableInterpolate, upsample2x_native

__all__ = ["PointwiseChain", "PointwiseAdd", "NormActPointwise", "UpsampleAdd", "activation_slope"]


def activation_slope(act: nn.Module) -> Optional[float]:
    """The negative slope of an activation the chain computes (ReLU: 0, LeakyReLU: its slope), else None."""
    if type(act) is nn.ReLU:
        return 0.0
    if type(act) is nn.LeakyReLU:
        return float(act.negative_slope)
    return None


def _plain(module: nn.Module) -> bool:
    return isinstance(module, (PointwiseConv, NormedPointwise)) and all(
        s == 1 for s in getattr(module, "stride", (1,))) and getattr(module, "layout", "keep") == "keep"


class PointwiseChain(nn.Module):
    """``second(act(first(z)))`` for a stride-1 :class:`PointwiseConv` or :class:`NormedPointwise`
    ``first``, a ReLU or LeakyReLU ``act`` and a stride-1 :class:`PointwiseConv` ``second`` (see the
    module docstring). The three modules are its children, their parameters shared, not copied."""

    def __init__(self, first: nn.Module, act: nn.Module, second: nn.Module) -> None:
        super().__init__()
        slope = activation_slope(act)
        if not (_plain(first) and isinstance(second, PointwiseConv) and _plain(second)) or slope is None:
            raise ValueError("PointwiseChain: expected a stride-1 PointwiseConv or NormedPointwise, a ReLU or LeakyReLU "
                             f"and a stride-1 PointwiseConv, got {type(first).__name__}, {type(act).__name__}, "
                             f"{type(second).__name__}")
        c = first.weight.shape[0]
        if second.weight.shape[1] != c:
            raise ValueError(f"PointwiseChain: the first product makes {c} channels, the second reads "
                             f"{second.weight.shape[1]}")
        self.first, self.act, self.second = first, act, second
        self.slope = slope

    def _native(self, z: Tensor) -> bool:
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or is_fake(z) or not native.available():
            return False
        if z.device.type != "cpu" or z.dtype != torch.float32 or z.dim() < 3:
            return False
        r1, c, r2 = self.first.weight.shape[1], self.first.weight.shape[0], self.second.weight.shape[0]
        if r1 > native.MAX_CHAIN[0] or c > native.MAX_CHAIN[1] or r2 > native.MAX_CHAIN[2]:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()) or z.requires_grad)

    def forward(self, z: Tensor) -> Tensor:
        if not self._native(z):
            return self.second(self.act(self.first(z)))
        # a channels-last core's output (passes.channels_last_cores) is copied to the usual layout: R1
        # channels, a quarter of the map that the chain then never writes
        z = z.contiguous()
        f = self.first
        c = f.weight.shape[0]
        s = self.second
        w2 = s.weight.reshape(s.weight.shape[0], c)
        if isinstance(f, NormedPointwise):
            # the narrow input's mean and covariance, the norm folded into the product and the chain,
            # in one native call: in torch ops the statistics and the fold were about 20 small ops
            # (0.3 ms a chain, SegResNet has 13) and a one-thread pass over a centred copy of z
            return native.normed_chain(z, f.weight.reshape(c, -1), f.bias, f.groups, f.norm_weight, f.norm_bias, f.eps,
                                       w2, s.bias, self.slope)
        w = f.weight.reshape(c, -1)
        b = f.bias if f.bias is not None else torch.zeros(c, dtype=w.dtype)
        return native.pointwise_chain(z, w, b, w2, s.bias, self.slope)

    def extra_repr(self) -> str:
        return (f"{self.first.weight.shape[1]} -> {self.first.weight.shape[0]} -> {self.second.weight.shape[0]}, "
                f"slope={self.slope}")


class PointwiseAdd(nn.Module):
    """``pointwise(z) + skip`` for a stride-1 :class:`PointwiseConv`: a block's last factor and the
    residual sum after it, one pass on the native kernel (:func:`tucker_fx.kernels.native.pointwise_add`)
    instead of a product that writes the full-width map and an add that reads it again. Measured one
    thread, 4 -> 16 channels at 64^3: 3.5 ms against 5.0 for ``addmm`` and ``add``; 1.9 ms written
    into ``skip`` (``inplace``, which the graph pass sets where nothing else reads ``skip``).
    Elsewhere (see :class:`PointwiseChain`) the module and an add.

    Example:
        >>> from tucker_fx.kernels.pointwise import PointwiseConv
        >>> last = PointwiseConv.from_conv(nn.Conv3d(4, 16, 1))
        >>> z, skip = torch.randn(1, 4, 5, 6, 7), torch.randn(1, 16, 5, 6, 7)
        >>> bool(torch.allclose(PointwiseAdd(last)(z, skip), last(z) + skip, atol=1e-5))
        True
    """

    def __init__(self, pointwise: nn.Module, inplace: bool = False) -> None:
        super().__init__()
        if not (isinstance(pointwise, PointwiseConv) and _plain(pointwise)):
            raise ValueError(f"PointwiseAdd: expected a stride-1 PointwiseConv, got {pointwise}")
        self.pointwise = pointwise
        self.inplace = inplace

    def forward(self, z: Tensor, skip: Tensor) -> Tensor:
        w = self.pointwise.weight
        c = w.shape[0]
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_fake(z) or is_fake(skip) or not native.available()
                or z.device.type != "cpu" or z.dtype != torch.float32 or skip.dtype != torch.float32
                or z.dim() < 3 or tuple(skip.shape) != (z.shape[0], c) + tuple(z.shape[2:])
                or w.shape[1] > native.MAX_CHAIN[1] or not skip.is_contiguous()
                or (torch.is_grad_enabled() and (z.requires_grad or skip.requires_grad
                                                 or any(p.requires_grad for p in self.parameters())))):
            return self.pointwise(z) + skip
        return native.pointwise_add(z.contiguous(), w.reshape(c, -1), self.pointwise.bias, skip, self.inplace)

    def extra_repr(self) -> str:
        return f"{self.pointwise.weight.shape[1]} -> {self.pointwise.weight.shape[0]} + skip, inplace={self.inplace}"


class NormActPointwise(nn.Module):
    """``pointwise(act(norm(x)))`` for a GroupNorm or an InstanceNorm without running statistics, a
    ReLU or LeakyReLU and a stride-1 :class:`PointwiseConv`: a pre-activation block's head (the norm
    of a residual sum, which cannot be folded into a 1x1 conv before it). On the native kernel
    (:func:`tucker_fx.kernels.native.norm_act_pointwise`) the statistics take one pass over ``x``
    and the normalised map is never written. In the compressed SegResNet's node profile (one thread,
    GroupNorm(8, 16), ReLU, 16 -> 4 at 64^3) the fused node took 3.4-4.4 ms, where the GroupNorm node
    alone had taken 2.7-3.0 ms and the first factor 2.1-2.4 ms, the ReLU apart (``torch.var_mean``,
    for the statistics, took 27 ms). Elsewhere (see :class:`PointwiseChain`) its three modules in
    turn.

    Example:
        >>> from tucker_fx.kernels.pointwise import PointwiseConv
        >>> norm, act, conv = nn.GroupNorm(4, 16), nn.ReLU(), PointwiseConv.from_conv(nn.Conv3d(16, 4, 1))
        >>> x = torch.randn(1, 16, 5, 6, 7)
        >>> bool(torch.allclose(NormActPointwise(norm, act, conv)(x), conv(act(norm(x))), atol=1e-5))
        True
    """

    def __init__(self, norm: nn.Module, act: nn.Module, pointwise: nn.Module) -> None:
        super().__init__()
        groups, slope = foldable_norm(norm), activation_slope(act)
        if groups is None or slope is None or not (isinstance(pointwise, PointwiseConv) and _plain(pointwise)):
            raise ValueError("NormActPointwise: expected a GroupNorm or InstanceNorm without running statistics, a ReLU "
                             f"or LeakyReLU and a stride-1 PointwiseConv, got {type(norm).__name__}, "
                             f"{type(act).__name__}, {type(pointwise).__name__}")
        c = getattr(norm, "num_channels", None) or getattr(norm, "num_features", None)
        if pointwise.weight.shape[1] != c:
            raise ValueError(f"NormActPointwise: the norm has {c} channels, the product reads {pointwise.weight.shape[1]}")
        self.norm, self.act, self.pointwise = norm, act, pointwise
        self.groups, self.slope = groups, slope

    def forward(self, x: Tensor) -> Tensor:
        w = self.pointwise.weight
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_fake(x) or not native.available() or x.device.type != "cpu"
                or x.dtype != torch.float32 or x.dim() < 3 or w.shape[0] > native.MAX_CHAIN[2]
                or w.shape[1] > native.MAX_CHAIN[1] or x[0, 0].numel() < 2
                or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))):
            return self.pointwise(self.act(self.norm(x)))
        norm = self.norm
        return native.norm_act_pointwise(x, self.groups, norm.weight, norm.bias, float(norm.eps), self.slope,
                                         w.reshape(w.shape[0], -1), self.pointwise.bias)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, slope={self.slope}, {self.pointwise.weight.shape[1]} -> {self.pointwise.weight.shape[0]}"


class UpsampleAdd(nn.Module):
    """``interpolate(x) + skip`` for a :class:`~tucker_fx.kernels.resample.SeparableInterpolate` that
    up-samples trilinearly by 2: a decoder's up-sampling and its skip connection in one native pass
    (:func:`tucker_fx.kernels.native.upsample2x_trilinear`), written into ``skip`` where ``inplace``.
    Measured one thread, 16 x 32^3 -> 64^3 plus a skip: 1.8 ms (1.5 in place) against 10.3 ms for
    the products and the add. Elsewhere the module and an add.

    Example:
        >>> up = SeparableInterpolate(scale_factor=2, mode="trilinear")
        >>> x, skip = torch.randn(1, 4, 3, 5, 6), torch.randn(1, 4, 6, 10, 12)
        >>> bool(torch.allclose(UpsampleAdd(up)(x, skip), up(x) + skip, atol=1e-6))
        True
    """

    def __init__(self, interpolate: nn.Module, inplace: bool = False) -> None:
        super().__init__()
        if not isinstance(interpolate, SeparableInterpolate):
            raise ValueError(f"UpsampleAdd: expected a SeparableInterpolate, got {type(interpolate).__name__}")
        self.interpolate = interpolate
        self.inplace = inplace

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        i = self.interpolate
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_fake(x) or is_fake(skip) or x.device.type != "cpu"
                or not x.is_contiguous() or not skip.is_contiguous() or skip.dtype != x.dtype
                or tuple(skip.shape) != (x.shape[0], x.shape[1]) + tuple(2 * int(s) for s in x.shape[2:])
                or (torch.is_grad_enabled() and skip.requires_grad)
                or not upsample2x_native(x, i.size, i.scale_factor, i.mode, i.align_corners, i.recompute_scale_factor,
                                         i.antialias)):
            return i(x) + skip
        return native.upsample2x_trilinear(x, skip, self.inplace)

    def extra_repr(self) -> str:
        return f"x2 trilinear + skip, inplace={self.inplace}"
