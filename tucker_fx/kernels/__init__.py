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

__all__ = [
    "FFTConv",
    "TuckerFFTConv",
    "LinearChain",
    "clear_fft_cache",
    "fft_conv",
    "fft_size",
    "next_fast_len",
]
