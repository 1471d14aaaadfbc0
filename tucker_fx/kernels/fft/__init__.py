"""Convolution by FFT, and the fused Tucker-2 block that runs its core by FFT.

A direct convolution kernel vectorises over channels; a Tucker core with two or three
channels and a large kernel (the paper's first layer: 2 -> 2 channels, kernel (5, 11, 11))
wastes the machine. Its cost by FFT does not depend on the kernel volume at all:

    rfftn(input) -> per-frequency (C_out x C_in) channel mix -> irfftn -> crop / stride

Everything here is plain torch (no FX, no compiled extension), differentiable, and has the
exact semantics of ``F.conv1d/2d/3d`` (cross-correlation, ``groups=1``), including
``padding='same'`` with even kernels, anisotropic stride/dilation and the four padding modes
of ``nn.ConvNd``.

Public API (also in :mod:`tucker_fx.kernels` and :mod:`tucker_fx.kernels.fft_conv`)
-------------------------------------------------------------------------------------
- :func:`fft_conv` -- functional, same arguments as ``F.conv{1,2,3}d`` plus ``padding_mode``.
- :class:`FFTConv` -- module holding weight/bias that caches the kernel spectrum;
  ``FFTConv.from_conv(conv)``.
- :class:`TuckerFFTConv` -- channel mix S->R_s, FFT core R_s->R_t, channel mix R_t->T (+bias),
  transforming only the R_s channels forward and the R_t (or T) channels back.
- :func:`fft_size` -- the FFT size per spatial dim that a given convolution uses.
- :func:`next_fast_len` -- the FFT length rule (2-3-5-7 smooth).
- :func:`clear_fft_cache` -- drop cached kernel spectra and work buffers.

Files, one job each:

- :mod:`.geometry` -- argument checks, padding/stride/dilation, FFT sizes (:func:`fft_size`);
- :mod:`.spectra` -- the transforms, the per-frequency mix, the kernel-spectrum cache and its
  autograd Function;
- :mod:`.engine` -- channel mixes and the no-autograd CPU path on reused, chunked buffers
  (its tuning constants: ``_CHUNK_BYTES``, ``_BUFFER_MIN_BYTES``, ``_LOOP_MIX_*``);
- :mod:`.functional` -- the block as a function, :func:`fft_conv`, :func:`clear_fft_cache`;
- :mod:`.modules` -- :class:`FFTConv` and :class:`TuckerFFTConv`.

How: zero padding is not materialised -- the left padding is folded into the kernel's
spectrum as a circular shift and the right padding is the FFT's own zero extension, so the
FFT length per dim is the smallest fast size >= input + max(left, right) pad (and input
samples no kept output reads are cropped away, which matters with stride). Only the kept
region of the circular correlation is read, so wrap-around elsewhere is harmless. Stride is
computed densely and subsampled. Other padding modes pad the input first, as nn.ConvNd does.

Numerics: computed in the input's dtype (float32 or float64; float16/bfloat16 are computed in
float32 and cast back). The error is that of the transforms, ~1e-7 relative in float32 and
~1e-15 in float64 -- a different rounding from a direct conv, not an approximation.

Caching (modules only): the kernel spectrum depends on the weights and on the input's spatial
shape, device and dtype. It is cached per (shape, device, dtype) on the Parameter objects
themselves (weakly), so a module and a GraphModule traced from it share it. Each call
compares ``weight._version`` and ``weight.data_ptr()``, so in-place updates
(``optimizer.step()``, ``with torch.no_grad(): w.mul_(2)``, ``load_state_dict``) and
replacement invalidate it. Writes through ``weight.data`` bypass the version counter: call
:func:`clear_fft_cache` after those. With gradients enabled the cached spectrum is still used
forward and the weights' gradient re-derives the spectrum in the backward pass, so caching
never changes results or gradients.

Speed (modules, no autograd, CPU): fresh multi-megabyte tensors cost page faults on this
kind of machine (measured 1.5-3.5 us per 4 KiB page, as much as the FFTs themselves), so
without autograd the modules keep their padded FFT input and spectral-mix output in reused
per-module buffers and run large batches in chunks (``reuse_buffers=False`` turns this
off). Run inference under ``torch.no_grad()`` / ``torch.inference_mode()`` to get it; with
autograd the plain (allocating) path runs.
"""

from .functional import clear_fft_cache, fft_conv
from .geometry import fft_size, next_fast_len
from .modules import FFTConv, TuckerFFTConv

__all__ = [
    "fft_conv",
    "fft_size",
    "FFTConv",
    "TuckerFFTConv",
    "clear_fft_cache",
    "next_fast_len",
]
