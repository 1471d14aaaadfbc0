"""Convolution by FFT: the import path of :mod:`tucker_fx.kernels.fft`, kept for its users.

The code lives in :mod:`tucker_fx.kernels.fft` (geometry, spectra, engine, functional,
modules; its docstring has the details). This module re-exports the public names and the
caches that tests inspect; the engine's tuning constants are set on
:mod:`tucker_fx.kernels.fft.engine`.

>>> from tucker_fx.kernels.fft_conv import fft_size
>>> fft_size((28, 120, 160), (5, 11, 11), padding=(2, 5, 5))
(30, 125, 168)
"""

from __future__ import annotations

from .fft import FFTConv, TuckerFFTConv, clear_fft_cache, fft_conv, fft_size, next_fast_len
from .fft.engine import _WORKSPACES
from .fft.functional import _fft_block
from .fft.modules import _fft_block_cached
from .fft.spectra import _SPECTRUM_CACHE

__all__ = [
    "fft_conv",
    "fft_size",
    "FFTConv",
    "TuckerFFTConv",
    "clear_fft_cache",
    "next_fast_len",
]
