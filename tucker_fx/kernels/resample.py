"""Linear, bilinear and trilinear interpolation as one small matrix product per spatial axis.

Linear interpolation is separable: along each spatial axis it is a fixed ``(out_len x in_len)``
matrix (two non-zeros a row), so ``F.interpolate(x, mode="trilinear")`` is three products, one
per axis. On the CPU ATen's ``upsample_trilinear3d`` reads eight inputs per output in a scalar
loop; the products run at the speed of a GEMM. Measured on this project's 2-core CPU (one thread,
``taskset -c 0``, fp32, batch 1, scale 2, ``align_corners=False``; medians of 21 interleaved runs,
``F.interpolate`` -> :class:`SeparableInterpolate`):

- 16 x 32^3 -> 64^3 (SegResNet's last upsample at 64^3): 23.2 -> 3.7 ms (x6.3)
- 32 x 16^3 -> 32^3: 6.0 -> 0.63 ms (x9.7)
- 64 x 8^3 -> 16^3: 1.72 -> 0.17 ms (x10)
- 64 x 4^3 -> 8^3: 0.31 -> 0.11 ms (x2.8)
- 4 x 64^3 -> 128^3: 56 -> 25 ms (x2.2)
- 64 x 56^2 -> 112^2, bilinear: 1.25 -> 0.96 ms (x1.3)
- 16 x 128^2 -> 256^2, bilinear: 1.55 -> 2.45 ms (lost)

In the (uncompressed) SegResNet at 1 x 1 x 64^3, symbolically traced, the three upsamples took
32 ms of 488 in ATen and 4.6 ms as products: 488 -> 469 ms.

A dense product costs ``in_len`` multiply-adds per output and axis where the interpolation needs
two, so the gain shrinks as the axes grow (and ATen's 2-d kernel is vectorised, so bilinear wins
only on short axes): :func:`separable_wins` in :mod:`tucker_fx.passes.resample` is the rule the
graph pass applies. The axes are applied in the order that measured fastest: for 3-d the middle
axis first (a batch of small products on the smallest tensor), then the first (one large product
per channel), then the last (one product over all rows); for 2-d the last axis, then the first.

The matrix of an axis is the interpolation of the identity, ``F.interpolate(torch.eye(L)[None],
mode="linear", ...)`` with the module's ``size``/``scale_factor`` and ``align_corners``, so it
follows ATen's coordinate rules exactly (a ``scale_factor`` sets the source coordinates as
``(dst + 0.5) / scale - 0.5``, a ``size`` as ``in / out``). The identity is interpolated in the
input's dtype: ATen computes the weights in float for a float32 input, and float32 weights
match it to 2e-7 on 7 -> 10 where float64 weights rounded to float32 were 1e-6 off. Matrices are
cached per (length, size or scale, ``align_corners``, device, dtype). The result equals
``F.interpolate`` up to float rounding (the same weights, summed in another order).

:class:`SeparableInterpolate` computes ``F.interpolate`` for any arguments; it takes the product
form only on the CPU, for float32/float64, a contiguous input and the arguments
:func:`is_separable_interpolate` accepts, and calls ``F.interpolate`` otherwise: under
``torch.compile`` (inductor has its own lowering of the upsample), on fake tensors (shape
propagation, ``torch.export``, which so get the plain upsample op), on other devices and layouts.
The products are differentiable. Trilinear up-sampling by exactly 2 without ``align_corners``
(the common decoder step) runs on the package's native kernel where it builds
(:func:`upsample2x_native`; 16 x 32^3 -> 64^3: 1.6 ms against 8.8 ms as products).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from tucker_fx.kernels.resample import SeparableInterpolate
    >>> up = SeparableInterpolate(scale_factor=2, mode="trilinear")
    >>> x = torch.randn(1, 4, 5, 6, 7)
    >>> up(x).shape
    torch.Size([1, 4, 10, 12, 14])
    >>> bool(torch.allclose(up(x), F.interpolate(x, scale_factor=2, mode="trilinear"), atol=1e-6))
    True
    >>> y = torch.randn(2, 3, 7, 7)
    >>> ref = F.interpolate(y, size=(10, 4), mode="bilinear", align_corners=True)
    >>> bool(torch.allclose(SeparableInterpolate((10, 4), mode="bilinear", align_corners=True)(y), ref, atol=1e-6))
    True
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from tucker_fx.kernels import native

__all__ = ["SeparableInterpolate", "is_separable_interpolate", "separable_interpolate", "interpolation_matrix",
           "axis_order", "upsample2x_native", "LINEAR_MODES"]

#: The modes the product form computes, and their number of spatial dims.
LINEAR_MODES: dict[str, int] = {"linear": 1, "bilinear": 2, "trilinear": 3}

_FAST_DTYPES = (torch.float32, torch.float64)
# the order in which the spatial axes are applied (measured; see the module docstring)
_ORDER = {1: (0,), 2: (1, 0), 3: (1, 0, 2)}

Size = Union[int, Sequence[int], None]
Scale = Union[float, Sequence[float], None]


def _per_axis(value: Union[int, float, Sequence, None], dims: int) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, (list, tuple, torch.Size)):
        return tuple(value)
    return (value,) * dims


def axis_order(dims: int) -> tuple[int, ...]:
    """The order in which the products apply the spatial axes (0 = the first spatial axis).

    Example:
        >>> axis_order(3), axis_order(2)
        ((1, 0, 2), (1, 0))
    """
    return _ORDER[dims]


def is_separable_interpolate(mode: str, *, size: Size = None, scale_factor: Scale = None,
                             recompute_scale_factor: Optional[bool] = None, antialias: bool = False,
                             size_at_call: bool = False) -> bool:
    """Arguments of ``F.interpolate`` that :class:`SeparableInterpolate` computes as products.

    ``mode`` linear/bilinear/trilinear, exactly one of ``size`` and ``scale_factor`` (a number or
    one per spatial dim, sizes >= 1 and scales > 0), ``recompute_scale_factor`` None or False, no
    antialias. ``size_at_call``: the size is given to ``forward`` (neither is fixed here).

    Example:
        >>> is_separable_interpolate("trilinear", scale_factor=2), is_separable_interpolate("nearest", scale_factor=2)
        (True, False)
        >>> is_separable_interpolate("bilinear", size=(8, 8), antialias=True)
        False
    """
    dims = LINEAR_MODES.get(mode)
    if dims is None or antialias or recompute_scale_factor:
        return False
    if size_at_call:
        return size is None and scale_factor is None
    if (size is None) == (scale_factor is None):
        return False
    values = _per_axis(size if size is not None else scale_factor, dims)
    if values is None or len(values) != dims:
        return False
    try:
        if size is not None:
            return all(not isinstance(v, bool) and int(v) == v and int(v) >= 1 for v in values)
        return all(math.isfinite(float(v)) and float(v) > 0 for v in values)
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=512)
def _matrices(in_len: int, out_len: Optional[int], scale: Optional[float], align_corners: bool,
              device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool]:
    # plain tensors (not inference tensors) without history, whatever mode the first call ran in
    with torch.inference_mode(False), torch.no_grad():
        # the weights in the input's dtype, as ATen computes them for it (float weights for float32)
        work = dtype if dtype in _FAST_DTYPES else torch.float64
        eye = torch.eye(in_len, dtype=work)
        mt = F.interpolate(eye.unsqueeze(0), size=out_len, scale_factor=scale, mode="linear",
                           align_corners=align_corners)[0]
        identity = mt.shape[0] == mt.shape[1] and bool(torch.equal(mt, eye))
        mt = mt.to(device=device, dtype=dtype).contiguous()  # (in, out)
        return mt.t().contiguous(), mt, identity


def interpolation_matrix(in_len: int, *, size: Optional[int] = None, scale_factor: Optional[float] = None,
                         align_corners: bool = False, device: Union[torch.device, str] = "cpu",
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``(out_len, in_len)`` matrix of 1-d linear interpolation (cached; do not modify it).

    Example:
        >>> interpolation_matrix(2, scale_factor=2)
        tensor([[1.0000, 0.0000],
                [0.7500, 0.2500],
                [0.2500, 0.7500],
                [0.0000, 1.0000]])
    """
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolation_matrix: expected exactly one of size and scale_factor")
    return _matrices(int(in_len), None if size is None else int(size), None if scale_factor is None else float(
        scale_factor), bool(align_corners), torch.device(device), dtype)[0]


def _along(x: Tensor, axis: int, m: Tensor, mt: Tensor) -> Tensor:
    """Apply ``m`` (out, in) along dim ``axis`` of the contiguous ``x``."""
    shape = x.shape
    length = shape[axis]
    pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    if post == 1:
        y = torch.mm(x.reshape(pre, length), mt)
    elif pre == 1:
        y = torch.mm(m, x.reshape(length, post))
    else:
        y = torch.bmm(m.expand(pre, -1, -1), x.reshape(pre, length, post))
    return y.reshape(*shape[:axis], m.shape[0], *shape[axis + 1:])


def _fast_path(x: Tensor, dims: int) -> bool:
    return (not torch.compiler.is_compiling() and type(x) in (torch.Tensor, nn.Parameter) and not is_fake(x)
            and x.device.type == "cpu" and x.dtype in _FAST_DTYPES and x.dim() == dims + 2 and x.numel() > 0
            and x.is_contiguous())


@torch.fx.wrap
def separable_interpolate(x: Tensor, size: Size = None, scale_factor: Scale = None, mode: str = "trilinear",
                          align_corners: Optional[bool] = None, recompute_scale_factor: Optional[bool] = None,
                          antialias: bool = False) -> Tensor:
    """``F.interpolate(x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)``,
    as products along the spatial axes where :class:`SeparableInterpolate` takes that form.

    Example:
        >>> x = torch.randn(1, 2, 5)
        >>> bool(torch.allclose(separable_interpolate(x, size=9, mode="linear"), F.interpolate(x, size=9, mode="linear")))
        True
    """
    dims = LINEAR_MODES.get(mode, 0)
    if _fast_path(x, dims) and not torch.jit.is_tracing() and upsample2x_native(x, size, scale_factor, mode, align_corners, recompute_scale_factor,
                                                 antialias):
        return native.upsample2x_trilinear(x)
    if not (_fast_path(x, dims) and is_separable_interpolate(
            mode, size=size, scale_factor=scale_factor, recompute_scale_factor=recompute_scale_factor,
            antialias=antialias)):
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                             recompute_scale_factor=recompute_scale_factor, antialias=antialias)
    sizes, scales = _per_axis(size, dims), _per_axis(scale_factor, dims)
    ac = bool(align_corners)
    y, applied = x, False
    for axis in _ORDER[dims]:
        m, mt, identity = _matrices(int(x.shape[2 + axis]), None if sizes is None else int(sizes[axis]),
                                    None if scales is None else float(scales[axis]), ac, x.device, x.dtype)
        if not identity:
            y, applied = _along(y, 2 + axis, m, mt), True
    return y if applied else x.clone()  # a new tensor, as F.interpolate returns


def upsample2x_native(x: Tensor, size: Size, scale_factor: Scale, mode: str, align_corners: Optional[bool],
                      recompute_scale_factor: Optional[bool], antialias: bool) -> bool:
    """Whether the native kernel computes this call: trilinear up-sampling of a float32 5-d tensor by
    exactly 2 on every axis without ``align_corners``, no gradient needed, the library built here.
    Measured one thread, 16 x 32^3 -> 64^3: 1.6 ms against 8.8 ms as products and 26.5 in ATen."""
    if mode != "trilinear" or align_corners or antialias or x.dim() != 5 or x.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    spatial = tuple(int(s) for s in x.shape[2:])
    if scale_factor is not None:
        scales = _per_axis(scale_factor, 3)
        if scales is None or any(float(s) != 2.0 for s in scales):
            return False
    elif size is None or _per_axis(size, 3) is None or tuple(int(s) for s in _per_axis(size, 3)) != tuple(
            2 * s for s in spatial):
        return False
    return native.available()


class SeparableInterpolate(nn.Module):
    """``F.interpolate`` with fixed arguments (as ``nn.Upsample``), linear modes as products per axis.

    Args:
        size, scale_factor, mode, align_corners, recompute_scale_factor, antialias: as for
            ``F.interpolate``. Both ``size`` and ``scale_factor`` may be left out: the size is then
            given to :meth:`forward` (a size computed in the graph, e.g. a skip connection's shape).

    The product form is taken on the CPU for float32/float64 contiguous inputs and the arguments
    :func:`is_separable_interpolate` accepts; everything else runs ``F.interpolate`` (see the module
    docstring). It has no parameters or buffers (the matrices are cached, not stored).
    """

    def __init__(self, size: Size = None, scale_factor: Scale = None, mode: str = "trilinear",
                 align_corners: Optional[bool] = None, recompute_scale_factor: Optional[bool] = None,
                 antialias: bool = False) -> None:
        super().__init__()
        if size is not None and scale_factor is not None:
            raise ValueError("SeparableInterpolate: expected at most one of size and scale_factor, got both")
        self.size = tuple(int(s) for s in size) if isinstance(size, (list, tuple, torch.Size)) else size
        self.scale_factor = (tuple(float(s) for s in scale_factor) if isinstance(scale_factor, (list, tuple))
                             else scale_factor)
        self.mode = mode
        self.align_corners = align_corners
        self.recompute_scale_factor = recompute_scale_factor
        self.antialias = antialias

    @classmethod
    def from_upsample(cls, up: nn.Upsample) -> "SeparableInterpolate":
        """The same map as ``up`` (any mode: the others run ``F.interpolate`` as ``up`` does)."""
        if not isinstance(up, nn.Upsample):
            raise ValueError(f"SeparableInterpolate.from_upsample: expected an nn.Upsample, got {type(up).__name__}")
        return cls(up.size, up.scale_factor, up.mode, up.align_corners, up.recompute_scale_factor)

    @property
    def separable(self) -> bool:
        """Whether the arguments are ones the product form computes (on a suitable input)."""
        return is_separable_interpolate(self.mode, size=self.size, scale_factor=self.scale_factor,
                                        recompute_scale_factor=self.recompute_scale_factor, antialias=self.antialias,
                                        size_at_call=self.size is None and self.scale_factor is None)

    def forward(self, x: Tensor, size: Size = None) -> Tensor:
        if size is not None and (self.size is not None or self.scale_factor is not None):
            raise ValueError("SeparableInterpolate: a size at call needs a module built without size and scale_factor")
        if size is None and self.size is None and self.scale_factor is None:
            raise ValueError("SeparableInterpolate: built without size or scale_factor, expected a size at call")
        return separable_interpolate(x, self.size if size is None else size, self.scale_factor, self.mode,
                                     self.align_corners, self.recompute_scale_factor, self.antialias)

    def extra_repr(self) -> str:
        what = f"size={self.size}" if self.size is not None else (
            f"scale_factor={self.scale_factor}" if self.scale_factor is not None else "size at call")
        return f"{what}, mode={self.mode!r}, align_corners={self.align_corners}"
