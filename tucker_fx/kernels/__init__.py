"""Runtime kernels for decomposed layers (pure torch)."""

from .fft_conv import (
    FFTConv,
    TuckerFFTConv,
    clear_fft_cache,
    fft_conv,
    fft_size,
    next_fast_len,
)
from .linear_chain import LinearChain
from .window_max import WindowMax

__all__ = [
    "FFTConv",
    "TuckerFFTConv",
    "LinearChain",
    "WindowMax",
    "clear_fft_cache",
    "fft_conv",
    "fft_size",
    "next_fast_len",
]
