"""The FFT block as a function: [mix S->R_s] -> FFT conv R_s->R_t -> [mix R_t->T] (+ bias).

:func:`fft_conv` is ``F.conv{1,2,3}d`` by FFT; :func:`_fft_block` is the whole Tucker block
that the modules of :mod:`tucker_fx.kernels.fft.modules` run; :func:`clear_fft_cache` drops
the kernel spectra (:mod:`.spectra`) and work buffers (:mod:`.engine`) that they keep.

>>> x, w = torch.randn(1, 2, 30), torch.randn(3, 2, 7)
>>> bool((fft_conv(x, w, padding=3) - F.conv1d(x, w, padding=3)).abs().max() < 1e-5)
True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F  # noqa: F401 (the examples use it)
from torch import Tensor, nn

from .engine import _WORKSPACES, _channel_mix, _run_buffered, _use_buffers
from .geometry import _IntOrTuple, _make_plan, _Padding
from .spectra import (
    _SPECTRUM_CACHE,
    _forward_spectrum,
    _inverse_crop,
    _kernel_spectrum,
    _spectral_mix,
    _spectrum,
)

__all__ = ["clear_fft_cache", "fft_conv"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32/float64 inputs compute in their dtype, half precisions in float32."""
    if not x.is_floating_point():
        raise TypeError(f"fft_conv expects a floating-point input, got {x.dtype}")
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _fft_block(
    x: Tensor,
    first: Optional[Tensor],
    core: Tensor,
    last: Optional[Tensor],
    bias: Optional[Tensor],
    stride: _IntOrTuple,
    padding: _Padding,
    dilation: _IntOrTuple,
    padding_mode: str,
    mix_last_in_frequency: bool,
    use_cache: bool,
    reuse_buffers: bool = False,
) -> Tensor:
    """The block on ``x``; ``first``/``last`` (matrices) may be None. ``use_cache``: keep the
    kernel spectrum on ``core`` (:mod:`.spectra`); ``reuse_buffers``: allow the no-autograd
    CPU path (:mod:`.engine`)."""
    n = core.dim() - 2
    if n not in (1, 2, 3):
        raise ValueError(
            f"expected a 1-3 d conv kernel (C_out, C_in, *k), got shape {tuple(core.shape)}"
        )
    c_in = first.shape[1] if first is not None else core.shape[1]
    unbatched = x.dim() == n + 1
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != n + 2 or x.shape[1] != c_in:
        raise ValueError(
            f"expected input (B, {c_in}, <{n} spatial dims>) or unbatched ({c_in}, <{n} dims>) "
            f"for kernel {tuple(core.shape)}, got {tuple(x.shape)}"
        )
    if first is not None and first.shape[0] != core.shape[1]:
        raise ValueError(f"first {tuple(first.shape)} does not feed core {tuple(core.shape)}")
    if last is not None and last.shape[1] != core.shape[0]:
        raise ValueError(f"last {tuple(last.shape)} does not follow core {tuple(core.shape)}")
    n_out = last.shape[0] if last is not None else core.shape[0]
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")

    out_dtype = x.dtype
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    plan = _make_plan(x, tuple(core.shape[2:]), stride, padding, dilation, padding_mode)

    # The kernel spectrum, cached on the Parameters themselves (not on dtype-cast copies).
    key = (plan, x.device, dtype)
    merged = last is not None and mix_last_in_frequency
    if merged:
        w_hat = _spectrum(
            core,
            key + ("last",),
            (core, last),
            # linearity: the spectrum of (last x core) is last x (the core's spectrum)
            lambda c, l: _kernel_spectrum(
                torch.einsum("tr,rs...->ts...", l.to(dtype), c.to(dtype)), plan
            ),
            use_cache,
        )
        c_mid = last.shape[0]
    else:
        w_hat = _spectrum(
            core, key, (core,), lambda c: _kernel_spectrum(c.to(dtype), plan), use_cache
        )
        c_mid = core.shape[0]
    first = None if first is None else first.to(dtype)
    last = None if (last is None or merged) else last.to(dtype)
    bias = None if bias is None else bias.to(dtype)

    if reuse_buffers and _use_buffers(x, core, c_mid, plan, (x, first, w_hat, last, bias)):
        y = _run_buffered(x, first, w_hat, c_mid, last, bias, plan, core)
    else:
        if first is not None:
            x = _channel_mix(x, first, None)
        y = _inverse_crop(_spectral_mix(_forward_spectrum(x, plan), w_hat), plan)
        if last is not None:
            y = _channel_mix(y, last, bias)
        elif bias is not None:
            y = y + bias.view(-1, *([1] * n))
        y = y.contiguous()
    if unbatched:
        y = y.squeeze(0)
    return y.to(out_dtype)


def fft_conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation)`` (groups=1) computed by FFT.

    ``weight`` is (C_out, C_in, *k) with 1-3 spatial dims; ``x`` is (B, C_in, *spatial) or
    unbatched (C_in, *spatial). ``padding`` is an int, a tuple, ``'same'`` or ``'valid'`` as
    in PyTorch; ``padding_mode`` is applied like ``nn.ConvNd`` does ('zeros', 'reflect',
    'replicate', 'circular'). Differentiable; the kernel spectrum is recomputed on every call
    (use :class:`FFTConv` to cache it).

    >>> x, w = torch.randn(1, 2, 8, 20, 20), torch.randn(3, 2, 3, 5, 5)
    >>> y = fft_conv(x, w, padding=(1, 2, 2))
    >>> ref = F.conv3d(x, w, padding=(1, 2, 2))
    >>> bool((y - ref).norm() / ref.norm() < 1e-5)
    True
    """
    return _fft_block(
        x, None, weight, None, bias, stride, padding, dilation, padding_mode, False, False
    )


def clear_fft_cache(module: Optional[nn.Module] = None) -> None:
    """Drop cached kernel spectra and work buffers: all of them, or those of ``module``.

    Needed only after writing weights through ``.data`` (which bypasses the version counter
    the cache checks), or to free the buffers' memory.

    >>> from tucker_fx.kernels import FFTConv
    >>> m = FFTConv(torch.randn(2, 2, 3))
    >>> _ = m(torch.randn(1, 2, 10))
    >>> clear_fft_cache(m)
    """
    if module is None:
        _SPECTRUM_CACHE.clear()
        _WORKSPACES.clear()
        return
    for p in module.parameters():
        _SPECTRUM_CACHE.pop(p, None)
        _WORKSPACES.pop(p, None)
