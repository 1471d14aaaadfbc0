"""Spectra of an FFT convolution, and the kernel-spectrum cache with its autograd Function.

The forward transform of the input, the kernel's spectrum (the left zero padding folded in as
a circular shift), the per-frequency channel mix, the inverse transform with its crop/stride,
and a cache of kernel spectra keyed weakly on the weight Parameters (see
:mod:`tucker_fx.kernels.fft` for when it is used and how it is invalidated).

>>> from tucker_fx.kernels.fft.geometry import _make_plan
>>> x, w = torch.randn(1, 2, 16), torch.randn(3, 2, 5)
>>> plan = _make_plan(x, (5,), 1, 2, 1, "zeros")
>>> y = _inverse_crop(_spectral_mix(_forward_spectrum(x, plan), _kernel_spectrum(w, plan)), plan)
>>> bool(torch.allclose(y, torch.nn.functional.conv1d(x, w, padding=2), atol=1e-5))
True
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

from .geometry import _Plan

__all__: list[str] = []  # internals of tucker_fx.kernels.fft


def _kernel_spectrum(weight: Tensor, plan: _Plan) -> Tensor:
    """The spectrum that turns a product with rfftn(input) into the cross-correlation.

    Equals ``conj(rfftn(w'))`` where w' is the dilated kernel placed circularly at offset
    ``-shift`` (the implicit left zero padding). For a real kernel the conjugate is the
    transform of the index-reversed sequence, so tap j simply goes to ``(shift - j*d) mod L``
    and no conjugation pass is needed. ``weight`` is (..., *kernel).

    (A pruned transform -- last dim first, each dim from its kernel extent -- was measured
    slower: the strided transforms along the leading dims and the final relayout cost more
    than one contiguous multi-dim r2c.)
    """
    n = len(plan.fft_shape)
    lead = weight.dim() - n
    z = weight.new_zeros(*weight.shape[:lead], *plan.fft_shape)
    index: list = [slice(None)] * lead
    for i in range(n):
        taps = torch.arange(plan.kernel[i], device=weight.device) * plan.dilation[i]
        shape = [1] * n
        shape[i] = plan.kernel[i]
        index.append(((plan.shifts[i] - taps) % plan.fft_shape[i]).view(shape))
    z[tuple(index)] = weight
    return torch.fft.rfftn(z, dim=tuple(range(-n, 0)))


def _spectral_mix(x_hat: Tensor, w_hat: Tensor) -> Tensor:
    """y[b, o, f] = sum_i x[b, i, f] * w[o, i, f] for complex x (B, C_in, *f), w (C_out, C_in, *f).

    C_in fused multiply-accumulate passes over the output. Measured against moving the
    frequencies to the batch dim of a matmul (complex bmm, or a real 2x2-block bmm): this wins
    at every size up to 32 x 32 channels at batch 1 and 8 (a complex bmm of these tiny
    per-frequency matrices is 2-6x slower); the real-block bmm only draws level near 64 x 64.
    In place is safe under autograd: addcmul saves its factors, not the accumulator.
    """
    y = x_hat[:, 0:1] * w_hat[:, 0]
    for i in range(1, x_hat.shape[1]):
        y = y.addcmul_(x_hat[:, i : i + 1], w_hat[:, i])
    return y


def _forward_spectrum(x: Tensor, plan: _Plan) -> Tensor:
    """rfftn of the input at the plan's FFT size (after any non-'zeros' pre-padding and crop)."""
    n = len(plan.fft_shape)
    if plan.pre_pad is not None:
        x = F.pad(x, plan.pre_pad, mode=plan.padding_mode)
    if plan.crop_input:
        for i, size in enumerate(plan.in_shape):
            x = x.narrow(x.dim() - n + i, 0, size)
    return torch.fft.rfftn(x, s=plan.fft_shape, dim=tuple(range(-n, 0)))


def _inverse_crop(y_hat: Tensor, plan: _Plan) -> Tensor:
    """irfftn of the mixed spectrum, keeping the plan's output positions (crop and stride)."""
    n = len(plan.fft_shape)
    y = torch.fft.irfftn(y_hat, s=plan.fft_shape, dim=tuple(range(-n, 0)))
    index = [slice(None), slice(None)]
    for o, s in zip(plan.out_shape, plan.stride):
        index.append(slice(0, (o - 1) * s + 1, s))
    return y[tuple(index)]


# ---------------------------------------------------------------------------------------------
# Kernel-spectrum cache
# ---------------------------------------------------------------------------------------------

# owner Parameter -> {key: (stamp, spectrum)}. Keyed weakly on the tensor object, so the cache
# lives exactly as long as the weight does and is shared by a module and any GraphModule traced
# from it (both hold the same Parameter objects).
_SPECTRUM_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MAX_ENTRIES_PER_OWNER = 4


class _CachedSpectrum(torch.autograd.Function):
    """Returns a cached spectrum; its backward re-derives the spectrum to reach the weights."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, spectrum: Tensor, compute: Callable[..., Tensor], *deps: Tensor
    ) -> Tensor:
        ctx.compute = compute
        ctx.save_for_backward(*deps)
        return spectrum.view_as(spectrum)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        deps = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [d.detach().requires_grad_(d.requires_grad) for d in deps]
            out = ctx.compute(*inputs)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, *[next(grads) if t.requires_grad else None for t in inputs])


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _stamp(deps: Sequence[Tensor]) -> Optional[tuple]:
    """(version, data_ptr) per tensor, or None unless all are plain, real, non-inference tensors
    (fake / functional / meta / vmapped tensors are never cached and never use work buffers)."""
    try:
        if any(
            type(d) not in (Tensor, nn.Parameter)
            or d.device.type == "meta"
            or is_fake(d)
            or d.is_inference()
            or _is_functorch_wrapped(d)
            for d in deps
        ):
            return None
        return tuple((d._version, d.data_ptr()) for d in deps)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _spectrum(
    owner: Tensor,
    key: tuple,
    deps: tuple[Tensor, ...],
    compute: Callable[..., Tensor],
    use_cache: bool,
) -> Tensor:
    """``compute(*deps)``, from the cache when the deps are unchanged; always differentiable."""
    stamp = _stamp(deps) if use_cache and not torch.compiler.is_compiling() else None
    if stamp is None:
        return compute(*deps)
    needs_grad = torch.is_grad_enabled() and any(d.requires_grad for d in deps)
    key = key + (torch.is_inference_mode_enabled(),)
    entries = _SPECTRUM_CACHE.get(owner)
    if entries is None:
        entries = {}
        _SPECTRUM_CACHE[owner] = entries
    hit = entries.get(key)
    if hit is not None and hit[0] == stamp:
        return _CachedSpectrum.apply(hit[1], compute, *deps) if needs_grad else hit[1]
    if needs_grad:  # e.g. training: the weights change every step, compute with autograd
        spec = compute(*deps)
        stored = spec.detach()
    else:
        with torch.no_grad():
            spec = stored = compute(*deps)
    entries.pop(key, None)
    while len(entries) >= _MAX_ENTRIES_PER_OWNER:
        entries.pop(next(iter(entries)))
    entries[key] = (stamp, stored)
    return spec


