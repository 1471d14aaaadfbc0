"""3-d max pooling in the memory layout where ATen's CPU kernel is fast.

ATen's CPU ``max_pool3d`` on a contiguous (N, C, D, H, W) tensor walks each output's window with
the channel as the outer loop and computes argmax indices it then drops; on channels_last_3d data
it vectorises over channels. Measured on this project's 2-core CPU (one thread, torch 2.13, fp32,
``benchmarks/zoo_speed.py`` profiles): the stem pool of MONAI's ResNet-10 (64 x 64^3, kernel 3,
stride 2, padding 1) took 161 ms as is and 66 ms converted to channels_last_3d and back; a
64 x 16 x 56 x 56 pool 47 -> 9.8 ms; a stride-1 16 x 64^3 pool 509 -> 90 ms. Same values, bit for
bit (a max is exact), for every kernel/stride/padding/dilation/ceil_mode.

:class:`ChannelsLastMaxPool` is that conversion around the same op, on the CPU in eager mode; on
other devices and under ``torch.compile``/``torch.export`` as the custom op ``tucker_fx::max_pool3d_cl`` under
``torch.compile`` (:mod:`tucker_fx.kernels.ops`); on other devices and under ``torch.export`` it is
the plain op. Pools whose windows tile the input go to :class:`~tucker_fx.kernels.WindowMax`
instead (a reshape and ``amax`` per dim: faster still).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from tucker_fx.kernels.max_pool import ChannelsLastMaxPool
    >>> x = torch.randn(1, 4, 9, 10, 11)
    >>> torch.equal(ChannelsLastMaxPool(3, 2, 1)(x), F.max_pool3d(x, 3, 2, 1))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from tucker_fx.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tucker_fx.*)
from tucker_fx.kernels.workspace import MMAP_BYTES, Workspace

__all__ = ["ChannelsLastMaxPool", "SeparableMaxPool", "MaxPoolSpec", "max_pool_spec", "separable_eligible"]

_Size = Union[int, Sequence[int]]


def _triple(v: Any, default: Optional[tuple[int, int, int]] = None) -> tuple[int, int, int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        assert default is not None
        return default
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(i) for i in v)
    return t * 3 if len(t) == 1 else t  # type: ignore[return-value]


@dataclass(frozen=True)
class MaxPoolSpec:
    """A 3-d max pool's geometry (no indices returned)."""

    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int] = (0, 0, 0)
    dilation: tuple[int, int, int] = (1, 1, 1)
    ceil_mode: bool = False

    @property
    def tiles(self) -> bool:
        """Windows that tile the input (stride = kernel, no padding/dilation/ceil_mode)."""
        return (self.stride == self.kernel_size and not any(self.padding) and self.dilation == (1, 1, 1)
                and not self.ceil_mode)


_FUNCTIONS = {F.max_pool3d, torch.max_pool3d, torch.ops.aten.max_pool3d.default}


def max_pool_spec(node: fx.Node, gm: fx.GraphModule) -> Optional[MaxPoolSpec]:
    """The spec of a 3-d max pool node (``nn.MaxPool3d``, ``F.max_pool3d``, ``aten.max_pool3d``)
    that returns values only; ``None`` for anything else."""
    if node.op == "call_module":
        pool = gm.get_submodule(str(node.target))
        if type(pool) is not nn.MaxPool3d or pool.return_indices:
            return None
        k = _triple(pool.kernel_size)
        return MaxPoolSpec(k, _triple(pool.stride, k), _triple(pool.padding), _triple(pool.dilation),
                           bool(pool.ceil_mode))
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if args.get("return_indices") or "kernel_size" not in args:
        return None
    if any(isinstance(v, fx.Node) for k, v in args.items() if k != "input"):
        return None
    k = _triple(args["kernel_size"])
    return MaxPoolSpec(k, _triple(args.get("stride"), k), _triple(args.get("padding", 0)),
                       _triple(args.get("dilation", 1)), bool(args.get("ceil_mode", False)))


class ChannelsLastMaxPool(nn.Module):
    """``F.max_pool3d`` computed on channels_last_3d data on the CPU; the result is contiguous."""

    def __init__(self, kernel_size: _Size, stride: Optional[_Size] = None, padding: _Size = 0,
                 dilation: _Size = 1, ceil_mode: bool = False) -> None:
        super().__init__()
        k = _triple(kernel_size)
        self.spec = MaxPoolSpec(k, _triple(stride, k), _triple(padding), _triple(dilation), bool(ceil_mode))

    @classmethod
    def from_spec(cls, spec: MaxPoolSpec) -> "ChannelsLastMaxPool":
        return cls(spec.kernel_size, spec.stride, spec.padding, spec.dilation, spec.ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        if torch.compiler.is_compiling():
            if x.dim() == 5 and x.device.type == "cpu" and not torch.compiler.is_exporting():
                return torch.ops.tucker_fx.max_pool3d_cl(x, list(s.kernel_size), list(s.stride), list(s.padding),
                                                         list(s.dilation), s.ceil_mode)
        elif x.dim() == 5 and x.device.type == "cpu" and not is_fake(x):
            y = F.max_pool3d(x.contiguous(memory_format=torch.channels_last_3d), s.kernel_size, s.stride,
                             s.padding, s.dilation, s.ceil_mode)
            return y.contiguous()
        return F.max_pool3d(x, s.kernel_size, s.stride, s.padding, s.dilation, s.ceil_mode)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"kernel_size={s.kernel_size}, stride={s.stride}, padding={s.padding}, dilation={s.dilation}, "
                f"ceil_mode={s.ceil_mode}")


def separable_eligible(spec: MaxPoolSpec) -> bool:
    """A pool :class:`SeparableMaxPool` computes: dilation 1, no ``ceil_mode``."""
    return spec.dilation == (1, 1, 1) and not spec.ceil_mode


def _axis_len(length: int, k: int, s: int, p: int) -> int:
    return (length + 2 * p - k) // s + 1


def _axis_max(x: Tensor, dim: int, k: int, s: int, p: int, into: Optional[Workspace] = None, slot: int = 0) -> Tensor:
    """Max over windows of ``k`` (stride ``s``, ``p`` implicit -inf on each side) along ``dim``; a
    result of :data:`MMAP_BYTES` or more goes into ``into``'s buffer ``slot`` when given."""
    length = x.shape[dim]
    out_len = _axis_len(length, k, s, p)
    full: list[Tensor] = []
    partial: list[tuple[int, int, Tensor]] = []
    for t in range(k):  # offset t of every window: input index i * s + t - p
        lo = max(0, -(-(p - t) // s))
        hi = min(out_len, (length - 1 - t + p) // s + 1)
        if hi <= lo:
            continue
        start = lo * s + t - p
        index = [slice(None)] * x.dim()
        index[dim] = slice(start, start + (hi - lo - 1) * s + 1, s)
        src = x[tuple(index)]
        if lo == 0 and hi == out_len:
            full.append(src)
        else:
            partial.append((lo, hi, src))
    shape = list(x.shape)
    shape[dim] = out_len
    buf = None
    if into is not None and len(full) >= 2 and math.prod(shape) * x.element_size() >= MMAP_BYTES:
        buf = into.take(slot, shape, x)
    if len(full) >= 2:
        out = torch.maximum(full[0], full[1]) if buf is None else torch.maximum(full[0], full[1], out=buf)
        rest = [(0, out_len, f) for f in full[2:]] + partial
    elif full:
        out = full[0].clone(memory_format=torch.contiguous_format)  # never the input itself
        rest = partial
    else:
        out, rest = x.new_full(shape, float("-inf")), partial
    for lo, hi, src in rest:
        part = out.narrow(dim, lo, hi - lo)
        torch.maximum(part, src, out=part)
    return out


class SeparableMaxPool(nn.Module):
    """``F.max_pool3d`` (dilation 1, no ``ceil_mode``) as three 1-d window maxima, outer dim first.

    A box window's max is the max of per-axis maxima. Along an axis, each of the k offsets of a
    window is a strided slice of the input, so a pass is k - 1 elementwise ``torch.maximum`` over
    whole slabs (vectorised, no indices); the depth pass runs first and halves the data (stride 2)
    before the inner axes, whose slices are strided runs. Measured one thread (channels_last /
    this): MONAI ResNet-10's stem pool, 64 x 64^3, kernel 3, stride 2, padding 1, 77.9 / 37.0 ms;
    64 x 16 x 56 x 56 6.7 / 3.2 ms; a stride-1 16 x 64^3 pool 72.3 / 13.5 ms. Exact (a max), the
    same values bit for bit, NaNs included. Where autograd records, and under ``torch.compile`` and
    ``torch.export``, it is the plain ``F.max_pool3d`` (ATen's gradient; inductor's own pooling).
    A first or second pass's map of 32 MiB or more (the stem pool of ResNet-10: 64 x 32 x 64^2) is
    written into a buffer the module keeps between calls (per thread, :class:`Workspace`): a fresh
    map that large is a new ``mmap`` whose pages fault in on every call, and the pool measured
    25.8 ms so against 11.2 with the heap kept (two threads, in the compressed model).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.randn(1, 4, 9, 10, 11)
        >>> torch.equal(SeparableMaxPool(3, 2, 1)(x), F.max_pool3d(x, 3, 2, 1))
        True
    """

    def __init__(self, kernel_size: _Size, stride: Optional[_Size] = None, padding: _Size = 0) -> None:
        super().__init__()
        k = _triple(kernel_size)
        self.spec = MaxPoolSpec(k, _triple(stride, k), _triple(padding))
        if any(2 * p > kk for p, kk in zip(self.spec.padding, k)):
            raise ValueError(f"SeparableMaxPool: padding {self.spec.padding} must be at most half the kernel {k}")
        self._scratch = Workspace()

    @classmethod
    def from_spec(cls, spec: MaxPoolSpec) -> "SeparableMaxPool":
        if not separable_eligible(spec):
            raise ValueError(f"SeparableMaxPool: expected dilation 1 and no ceil_mode, got {spec}")
        return cls(spec.kernel_size, spec.stride, spec.padding)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (4, 5):
            raise ValueError(f"SeparableMaxPool: expected a (N, C, D, H, W) or (C, D, H, W) input, got {tuple(x.shape)}")
        s = self.spec
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            return F.max_pool3d(x, s.kernel_size, s.stride, s.padding)  # inductor pools on its own; ATen's gradient
        scratch = self.__dict__.get("_scratch")  # None in a module pickled before it had one
        for i in range(3):  # the first two passes' maps, never returned, in kept buffers where they are large
            x = _axis_max(x, x.dim() - 3 + i, s.kernel_size[i], s.stride[i], s.padding[i],
                          scratch if i < 2 and x.device.type == "cpu" and not is_fake(x) else None, i)
        return x

    def extra_repr(self) -> str:
        s = self.spec
        return f"kernel_size={s.kernel_size}, stride={s.stride}, padding={s.padding}"
