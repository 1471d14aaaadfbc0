"""Wall-clock timing: medians of repeated runs, candidates interleaved so drift hits all alike.

Example:
    >>> import torch
    >>> from tucker_fx._internal.timing import median_ms, compare_ms
    >>> median_ms(torch.relu, torch.randn(100), repeats=3) > 0
    True
    >>> sorted(compare_ms({"a": lambda: torch.relu(torch.randn(10)), "b": lambda: None}, repeats=3))
    ['a', 'b']
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Optional

import torch

__all__ = ["median_ms", "compare_ms", "compare_samples", "sync"]


def sync(device: Optional[torch.device] = None) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[..., Any], *args: Any, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds, under ``torch.no_grad``."""
    return compare_ms({"fn": lambda: fn(*args)}, repeats=repeats, warmup=warmup)["fn"]


def compare_ms(fns: dict[str, Callable[[], Any]], *, repeats: int = 7, warmup: int = 1,
               min_sample_ms: float = 1.0) -> dict[str, float]:
    """Median wall time (ms) of each callable, run round-robin: a, b, c, a, b, c, ..."""
    samples = compare_samples(fns, repeats=repeats, warmup=warmup, min_sample_ms=min_sample_ms)
    return {k: statistics.median(v) for k, v in samples.items()}


def compare_samples(fns: dict[str, Callable[[], Any]], *, repeats: int = 7, warmup: int = 1,
                    min_sample_ms: float = 1.0) -> dict[str, list[float]]:
    """Every timed run (ms per call) of each callable, round-robin, under ``torch.no_grad``.

    A callable faster than ``min_sample_ms`` is called several times per sample (the number
    estimated from its last warm-up call) and the sample is the mean per call: a 10 us layer
    timed one call at a time measures the timer and the scheduler more than the layer.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    samples: dict[str, list[float]] = {k: [] for k in fns}
    number = dict.fromkeys(fns, 1)
    with torch.no_grad():
        for _ in range(max(warmup, 1 if min_sample_ms > 0 else 0)):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                sync()
                ms = (time.perf_counter() - start) * 1e3
                number[name] = max(1, min(1000, math.ceil(min_sample_ms / max(ms, 1e-6))))
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(number[name]):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) * 1e3 / number[name])
    return samples
