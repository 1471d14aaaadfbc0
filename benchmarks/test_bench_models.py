"""Wall-clock time of each model variant: the comparison the project exists for.

    pytest benchmarks/test_bench_models.py --benchmark-enable --benchmark-json=out.json \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Groups read ``<model> batch <n> <device>``; in each, the variants: original (eager),
original_lowered (same lowering passes, no decomposition: the fair baseline),
original_compiled (inductor), tucker (plain decomposed graph), tucker_lowered (fused and
lowered), tucker_compiled. THETIS uses the paper's ranks; the ResNet a quarter of each rank.
For a single table of medians and ratios from one interleaved run, use ``tucker-fx bench``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICES
from tucker_fx.reporting.bench import VARIANTS
from tucker_fx.reporting.timing import sync

pytestmark = pytest.mark.slow  # full-size models: run with --run-slow or --benchmark-enable


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", (1, 8))
@pytest.mark.parametrize("model", ("thetis", "resnet3d18"))
def test_model_variant(benchmark, build, model, batch, device, variant):
    module, x, facts = build(model, batch, device, variant)
    benchmark.group = f"{model} batch {batch} {device}"
    benchmark.name = variant
    benchmark.extra_info.update({k: v for k, v in facts.items() if k != "build_s"})

    def run():
        with torch.no_grad():
            out = module(x)
        sync(x.device)
        return out

    out = benchmark(run)
    assert out.shape[0] == batch and torch.isfinite(out).all()
