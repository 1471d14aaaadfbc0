"""Geometry of an FFT convolution: argument checks, padding/stride/dilation and the FFT sizes.

Pure shape arithmetic (no tensors but the one whose shape :func:`_make_plan` reads): how a
``F.conv{1,2,3}d`` call maps onto ``rfftn -> per-frequency mix -> irfftn -> crop / stride``.

>>> fft_size((28, 120, 160), (5, 11, 11), padding=(2, 5, 5))
(30, 125, 168)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["fft_size", "next_fast_len"]

_IntOrTuple = Union[int, Sequence[int]]
_Padding = Union[int, Sequence[int], str]
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def next_fast_len(n: int, even: bool = False) -> int:
    """Smallest ``m >= n`` whose prime factors are all in {2, 3, 5, 7} (and even if asked).

    Measured here (MKL FFT, 2 cores): for the paper's first layer the smallest such sizes
    (30, 125, 168) beat the nearby powers of two and 2-3 smooth sizes.

    >>> next_fast_len(125), next_fast_len(125, even=True), next_fast_len(11)
    (125, 126, 12)
    """
    if n <= 1:
        return 2 if even else 1
    m = n
    while True:
        if not (even and m % 2):
            r = m
            for p in (2, 3, 5, 7):
                while r % p == 0:
                    r //= p
            if r == 1:
                return m
        m += 1


def _tuple(value: _IntOrTuple, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) == 1 and n > 1:
        out = out * n
    if len(out) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return out


def _normalize(
    n: int,
    kernel: Sequence[int],
    stride: _IntOrTuple,
    padding: _Padding,
    dilation: _IntOrTuple,
    padding_mode: str,
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Return (stride, ((left, right) per dim), dilation) for an n-d conv."""
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    stride_t = _tuple(stride, n, "stride")
    dilation_t = _tuple(dilation, n, "dilation")
    if any(s < 1 for s in stride_t):
        raise ValueError(f"stride must be positive, got {stride_t}")
    if any(d < 1 for d in dilation_t):
        raise ValueError(f"dilation must be positive, got {dilation_t}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = tuple((0, 0) for _ in range(n))
        elif padding == "same":
            if any(s != 1 for s in stride_t):
                raise ValueError("padding='same' is not supported for strided convolutions")
            # PyTorch's rule: total = d*(k-1), left = total // 2, the extra one on the right.
            pads = tuple(
                (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for k, d in zip(kernel, dilation_t)
            )
        else:
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    else:
        p = _tuple(padding, n, "padding")
        if any(v < 0 for v in p):
            raise ValueError(f"padding must be non-negative, got {p}")
        pads = tuple((v, v) for v in p)
    return stride_t, pads, dilation_t


@dataclass(frozen=True)
class _Plan:
    """How one convolution runs by FFT (all tuples are per spatial dim)."""

    pre_pad: Optional[tuple[int, ...]]  # F.pad argument (non-'zeros' modes), else None
    padding_mode: str
    in_shape: tuple[int, ...]  # spatial shape fed to the FFT (after pre-pad / crop)
    crop_input: bool  # narrow the input to in_shape before the FFT
    fft_shape: tuple[int, ...]
    shifts: tuple[int, ...]  # implicit left zero padding, folded into the kernel spectrum
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    out_shape: tuple[int, ...]
    stride: tuple[int, ...]


def _plan(
    in_shape: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
    dilation: tuple[int, ...],
    padding_mode: str,
) -> _Plan:
    n = len(in_shape)
    pre_pad = None
    if padding_mode != "zeros" and any(l or r for l, r in pads):
        # nn.ConvNd: F.pad(x, reversed pads, mode) then a conv with padding 0.
        pre_pad = tuple(v for lr in reversed(pads) for v in lr)
        in_shape = tuple(s + l + r for s, (l, r) in zip(in_shape, pads))
        pads = tuple((0, 0) for _ in range(n))
    fft_shape, used, shifts, out_shape = [], [], [], []
    crop = False
    for i, (size, k, s, (pl, pr), d) in enumerate(zip(in_shape, kernel, stride, pads, dilation)):
        k_eff = d * (k - 1) + 1
        full = size + pl + pr - k_eff + 1
        if full < 1:
            raise ValueError(
                f"kernel extent {k_eff} (kernel {k}, dilation {d}) is larger than the padded "
                f"input size {size + pl + pr} in spatial dim {i}"
            )
        out = (full - 1) // s + 1
        last = (out - 1) * s  # last output position computed
        # Input samples [0, size) at offset -pl; output n reads x[n - pl + j*d].
        need_in = max(1, min(size, last + k_eff - pl))  # samples that kept outputs read
        # Circular correlation of length L is exact on the kept outputs 0..last iff
        # L >= need_in + pl (no wrap on the left), L >= last + k_eff - pl (none on the right),
        # L > last (each kept output has its own index) and L >= k_eff (taps do not collide).
        length = max(need_in + pl, last + k_eff - pl, last + 1, k_eff)
        fast = next_fast_len(length, even=(i == n - 1))
        if fast < size + pl:  # the FFT would wrap unused trailing samples in: crop them
            crop = True
        else:
            need_in = size
        fft_shape.append(fast)
        used.append(need_in)
        shifts.append(pl)
        out_shape.append(out)
    return _Plan(
        pre_pad=pre_pad,
        padding_mode=padding_mode,
        in_shape=tuple(used),
        crop_input=crop,
        fft_shape=tuple(fft_shape),
        shifts=tuple(shifts),
        kernel=kernel,
        dilation=dilation,
        out_shape=tuple(out_shape),
        stride=stride,
    )


_plan_cached = functools.lru_cache(maxsize=4096)(_plan)


def fft_size(
    input_shape: Sequence[int],
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
    padding_mode: str = "zeros",
) -> tuple[int, ...]:
    """FFT size per spatial dim used for a conv of ``kernel_size`` over spatial ``input_shape``.

    Zero padding costs nothing extra (it is folded into the kernel's spectrum); other padding
    modes pad the input first.

    >>> fft_size((28, 120, 160), (5, 11, 11), padding=(2, 5, 5))
    (30, 125, 168)
    """
    shape = tuple(int(s) for s in input_shape)
    k = _tuple(kernel_size, len(shape), "kernel_size")
    s, pads, d = _normalize(len(shape), k, stride, padding, dilation, padding_mode)
    return _plan_cached(shape, k, s, pads, d, padding_mode).fft_shape


def _make_plan(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: _IntOrTuple,
    padding: _Padding,
    dilation: _IntOrTuple,
    padding_mode: str,
) -> _Plan:
    """The :class:`_Plan` of a conv with ``kernel`` over the trailing spatial dims of ``x``."""
    n = len(kernel)
    s, pads, d = _normalize(n, kernel, stride, padding, dilation, padding_mode)
    # (Dynamo traces the uncached function: it warns about lru_cache wrappers.)
    plan = _plan if torch.compiler.is_compiling() else _plan_cached
    return plan(tuple(x.shape[-n:]), kernel, s, pads, d, padding_mode)


def _check_mode_and_padding(
    n: int, padding: _Padding, padding_mode: str
) -> Union[tuple[int, ...], str]:
    """A module's ``padding`` as stored: ``'same'``/``'valid'`` or one int per spatial dim."""
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        return padding
    return _tuple(padding, n, "padding")

