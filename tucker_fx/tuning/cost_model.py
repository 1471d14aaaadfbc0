"""The cost model used when tuning is off: which lowering of a conv block is likely fastest.

Throughputs were measured on this project's 2-core CPU on the THETIS net's C1 (docs/design.md): a direct conv with
few channels runs far below peak (C1's 2->2 (5,11,11) core: 2.6 GFLOP in ~95 ms), an FFT
pipeline runs at a steady rate (~150 MFLOP in ~18 ms). The model only has to rank the
candidates, not predict times.

Example:
    >>> from tucker_fx.tuning.cost_model import direct_conv_seconds, fft_conv_seconds
    >>> direct = direct_conv_seconds(macs=1_300_531_200, c_in=2, c_out=2)
    >>> fft = fft_conv_seconds(batch=1, c_in=2, c_out=2, fft_shape=(32, 130, 170))
    >>> fft < direct
    True
"""

from __future__ import annotations

import math

__all__ = ["direct_conv_seconds", "fft_conv_seconds", "PEAK_FLOPS", "FFT_FLOPS"]

PEAK_FLOPS = 1.0e11  # direct conv with many channels
FFT_FLOPS = 8.0e9  # rfftn / per-frequency product / irfftn pipeline


def direct_conv_seconds(*, macs: int, c_in: int, c_out: int) -> float:
    """Direct conv: vectorised over channels, so few channels waste the machine."""
    efficiency = min(1.0, (c_in * c_out) / 16.0)
    return 2 * macs / (PEAK_FLOPS * efficiency)


def fft_conv_seconds(*, batch: int, c_in: int, c_out: int, fft_shape: tuple[int, ...]) -> float:
    """rfftn of c_in channels, a (c_out x c_in) complex product per frequency, irfftn of c_out."""
    n = math.prod(fft_shape)
    freqs = n // fft_shape[-1] * (fft_shape[-1] // 2 + 1)
    transforms = 2.5 * n * math.log2(max(n, 2)) * batch * (c_in + c_out)
    products = 8 * freqs * c_in * c_out * batch
    return (transforms + products) / FFT_FLOPS
