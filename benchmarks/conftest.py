"""Shared fixtures of the benchmark suite.

With ``--benchmark-enable`` every variant is built at full size (lowerings chosen by timing).
In the default, disabled mode (the CI smoke run) each benchmark runs once on a smaller
ResNet input, lowerings come from the cost model, and inductor variants are compiled for the
THETIS net only (a cold compile takes tens of seconds on 2 cores); set
``TUCKER_FX_BENCH_COMPILE=1`` to compile everything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch._dynamo

from tucker_fx.reporting.bench import build_variants

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
SMOKE_RESNET_SHAPE = (1, 3, 8, 56, 56)


def _benchmarks_enabled(config) -> bool:
    """pytest-benchmark's own rule: ``--benchmark-enable`` overrides the ``--benchmark-disable`` of addopts."""
    return not (config.getoption("benchmark_disable", default=True)
                and not config.getoption("benchmark_enable", default=False))


def pytest_addoption(parser):
    """``--run-slow``: the same option (and hooks) as tests/conftest.py, for ``pytest benchmarks`` alone."""
    try:
        parser.addoption("--run-slow", action="store_true", default=False,
                         help="also run the tests marked slow (the README's full test command does)")
    except ValueError:  # registered already by tests/conftest.py
        pass


def pytest_collection_modifyitems(config, items):
    """The benchmarks (full-size models) are marked slow: deselected unless ``--run-slow`` or
    ``--benchmark-enable`` is given. Only items of this folder: tests/conftest.py handles its own."""
    if config.getoption("--run-slow") or _benchmarks_enabled(config):
        return
    here = Path(__file__).resolve().parent
    slow = [item for item in items if item.get_closest_marker("slow") is not None and here in item.path.parents]
    if slow:
        skip = set(map(id, slow))
        items[:] = [item for item in items if id(item) not in skip]
        config.hook.pytest_deselected(items=slow)


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    return not _benchmarks_enabled(request.config)


@pytest.fixture(scope="session")
def variant_cache():
    cache: dict = {}
    yield cache
    cache.clear()
    torch._dynamo.reset()


@pytest.fixture
def build(variant_cache, smoke):
    def get(model: str, batch: int, device: str, variant: str):
        if variant.endswith("_compiled") and smoke and model != "thetis" and not os.environ.get("TUCKER_FX_BENCH_COMPILE"):
            pytest.skip("inductor compile of this model skipped in the smoke run (TUCKER_FX_BENCH_COMPILE=1 to run it)")
        key = (model, batch, device, variant)
        if key not in variant_cache:
            shape = SMOKE_RESNET_SHAPE if (smoke and model == "resnet3d18") else None
            built, x, facts = build_variants(model, batch, device, variants=(variant,), tune=not smoke,
                                             input_shape=shape)
            variant_cache[key] = (built[variant], x, facts)
        return variant_cache[key]

    return get
