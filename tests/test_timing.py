"""Timing helpers: round-robin order, and fast callables timed over several calls per sample."""

from __future__ import annotations

import pytest

from tucker_fx.reporting.timing import compare_ms, compare_samples


def test_round_robin_order_and_sample_count():
    order: list[str] = []
    samples = compare_samples({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                              repeats=3, warmup=1, min_sample_ms=0)
    assert order == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert [len(v) for v in samples.values()] == [3, 3] and all(t >= 0 for v in samples.values() for t in v)


def test_fast_callable_gets_several_calls_per_sample():
    calls = {"fast": 0}

    def fast() -> None:
        calls["fast"] += 1

    # a no-op takes far less than 50 ms: each of the 3 samples is the mean of many calls
    samples = compare_samples({"fast": fast}, repeats=3, min_sample_ms=50.0)
    assert calls["fast"] > 1 + 3 * 10
    assert len(samples["fast"]) == 3


def test_bad_repeats():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        compare_ms({"a": lambda: None}, repeats=0)
