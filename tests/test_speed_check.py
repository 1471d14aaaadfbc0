"""The speed check after compress: timings in the result, a warning with the figures when slower,
the compiled module kept only when it wins. Timings are faked: no timing threshold in a unit test."""

import warnings

import pytest
import torch
import torch.nn as nn

import tucker_fx
import tucker_fx.api as api

X = torch.randn(1, 8, 10, 10, 10)
CONFIG = tucker_fx.TuckerConfig(rank=0.5, progress=False)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(8, 16, 3), nn.ReLU(), nn.Conv3d(16, 16, 3)).eval()


def _fake_samples(ms: dict[str, list[float]]):
    def fake(fns, **kwargs):
        for fn in fns.values():
            fn()  # every callable still runs (the compiled one included)
        return {k: list(ms[k]) for k in fns}
    return fake


def test_timing_is_in_the_result_and_the_summary():
    result = tucker_fx.compress(_net(), X, config=CONFIG)
    t = result.timing
    assert set(t) >= {"original_ms", "compressed_ms", "speedup", "spread_ms", "busy"}
    assert t["speedup"] == pytest.approx(t["original_ms"] / t["compressed_ms"])
    assert "time at the example inputs: original" in result.summary()
    assert tucker_fx.compress(_net(), X, config=CONFIG.replace(speed_check=False)).timing is None


def test_slower_than_the_original_warns_with_the_figures(monkeypatch):
    monkeypatch.setattr(api, "compare_samples", _fake_samples({"original": [1.0] * 5, "compressed": [2.0] * 5}))
    with pytest.warns(tucker_fx.SlowerThanOriginalWarning, match=r"2 ms vs 1 ms \(medians of 5.*tune=True"):
        result = tucker_fx.compress(_net(), X, config=CONFIG)
    assert result.timing["speedup"] == pytest.approx(0.5)
    assert any(n.startswith("WARNING: the compressed model ran slower") for n in result.plan.notes)


def test_faster_gives_no_warning_and_a_busy_machine_is_said(monkeypatch):
    monkeypatch.setattr(api, "compare_samples", _fake_samples({"original": [2.0, 2.0, 9.0, 2.0, 2.0],
                                                                "compressed": [1.0] * 5}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tucker_fx.SlowerThanOriginalWarning)
        result = tucker_fx.compress(_net(), X, config=CONFIG)
    assert result.timing["busy"] and "the machine was busy" in result.summary()


@pytest.mark.parametrize(("compiled_ms", "kept"), [(0.5, "compiled"), (3.0, "eager")])
def test_inductor_result_is_kept_only_when_faster(monkeypatch, compiled_ms, kept):
    compiled_marker = []

    def fake_compile(module, *args, **kwargs):
        def run(*inputs):
            compiled_marker.append(1)
            return module(*inputs)
        return run

    monkeypatch.setattr(api.torch, "compile", fake_compile)
    monkeypatch.setattr(api, "compare_samples", _fake_samples({"original": [4.0] * 5, "compressed": [1.0] * 5,
                                                                "compiled": [compiled_ms] * 5}))
    result = tucker_fx.compress(_net(), X, config=CONFIG.replace(inductor=True))
    assert result.timing["compiled_ms"] == compiled_ms
    if kept == "eager":
        assert result.compiled is result.module
        assert any("inductor was slower" in n for n in result.plan.notes)
    else:
        assert result.compiled is not result.module and compiled_marker
