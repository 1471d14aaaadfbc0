"""Timing of the analysis pass on the paper's full-size input (fake tensors, no compute).

    pytest benchmarks/test_bench_analysis.py --benchmark-enable
"""

import torch

import tucker_fx
from tucker_fx.models import THETIS_INPUT_SHAPE, thetis_net


def test_analyze_thetis_full_size(benchmark):
    model = thetis_net()
    x = torch.empty(THETIS_INPUT_SHAPE)
    tucker_fx.analyze(model, x)  # the first call in a process imports torch._dynamo (~1 s)
    benchmark.group = "analysis: thetis 1x4x28x120x160"
    report = benchmark(tucker_fx.analyze, model, x)
    assert report.total_flops == 15_774_993_744
