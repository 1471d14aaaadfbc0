"""Speed of the pass itself: compress a 3D ResNet-18 (33M params, 20 Conv3d) with EVBMF ranks.

    pytest benchmarks/test_bench_compress.py --benchmark-enable
"""

import pytest
import torch

import tucker_fx
from tucker_fx.models import RESNET3D_INPUT_SHAPE, resnet3d18


@pytest.mark.slow  # full-size resnet3d18: runs with --run-slow or --benchmark-enable
def test_compress_resnet3d18_vbmf(benchmark):
    model = resnet3d18()
    x = torch.randn(RESNET3D_INPUT_SHAPE)
    config = tucker_fx.TuckerConfig(progress=False)
    benchmark.group = "compress: resnet3d18 EVBMF (incl. validation)"
    result = benchmark.pedantic(tucker_fx.compress, args=(model, x), kwargs={"config": config},
                                rounds=3, iterations=1, warmup_rounds=0)
    assert result.after.total_params < result.before.total_params
