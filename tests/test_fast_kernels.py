"""PointwiseConv / MkldnnConv and the fast_kernels pass: exact, counted, saved and exported like convs."""

import pytest
import torch
import torch.nn as nn

import tucker_fx
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.kernels import native
from tucker_fx.kernels.pointwise import MkldnnConv, PointwiseConv, is_pointwise
from tucker_fx.passes.fast_kernels import UseFastKernels, mkldnn_wins, pointwise_wins

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_conv_is_the_conv(dims, stride, bias, batch):
    torch.manual_seed(0)
    conv = CONVS[dims](8, 5, 1, stride=stride, bias=bias).double()
    x = torch.randn(batch, 8, *([7] * dims), dtype=torch.float64)
    pc = PointwiseConv.from_conv(conv)
    assert torch.allclose(pc(x), conv(x), rtol=0, atol=1e-12)
    if dims in LAST:  # channels-last in, channels-last out
        y = pc(x.contiguous(memory_format=LAST[dims]))
        assert torch.allclose(y, conv(x), rtol=0, atol=1e-12) and y.is_contiguous(memory_format=LAST[dims])
    assert pc.state_dict().keys() == conv.state_dict().keys()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"),
                         [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 1), (1, 1, 1, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_mkldnn_conv_is_the_conv(dims, stride, padding, dilation, groups, bias):
    torch.manual_seed(0)
    conv = CONVS[dims](6, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    x = torch.randn(2, 6, *([9] * dims))
    assert torch.allclose(MkldnnConv(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="expected a 1x1 conv"):
        PointwiseConv.from_conv(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="numeric zero padding"):
        MkldnnConv(nn.Conv3d(3, 3, 3, padding="same"))
    assert not is_pointwise(nn.Conv2d(4, 4, 1, groups=2))


def test_rules_follow_the_measured_cases():
    cpu = torch.device("cpu")
    core = nn.Conv3d(16, 16, 3, padding=1)
    assert mkldnn_wins(core, (1, 16, 16, 56, 56), cpu, torch.float32)  # ATen: slow_conv3d
    assert not mkldnn_wins(core, (8, 16, 16, 56, 56), cpu, torch.float32)  # ATen picks mkldnn itself
    assert not mkldnn_wins(core, (1, 16, 16, 56, 56), cpu, torch.float64)
    assert not mkldnn_wins(nn.Conv2d(16, 16, 3), (1, 16, 56, 56), cpu, torch.float32)
    assert pointwise_wins(nn.Conv3d(64, 16, 1), (1, 64, 16, 56, 56), cpu, torch.float32)
    assert not pointwise_wins(nn.Conv3d(64, 16, 1), (1, 64, 1, 2, 2), cpu, torch.float32)


def _block_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(32, 8, 1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(8, 32, 1, stride=2)).eval()


def test_pass_replaces_and_keeps_the_output_and_the_counts():
    net = _block_net()
    x = torch.randn(1, 32, 8, 16, 16)
    gm = torch.fx.symbolic_trace(net)
    propagate_shapes(gm, (x,))
    before = tucker_fx.analyze(gm, x)
    result = UseFastKernels()(gm)
    gm.recompile()
    kinds = [type(m).__name__ for m in gm.children()]
    core = "NarrowConv3d" if native.available() else "MkldnnConv"  # 8 -> 8: narrow (kernels.narrow_conv)
    assert result.modified and kinds == ["PointwiseConv", "ReLU", core, "ReLU", "PointwiseConv"]
    with torch.no_grad():
        assert torch.allclose(gm(x), net(x), rtol=1e-5, atol=1e-5)
    after = tucker_fx.analyze(gm, x)
    assert (after.total_flops, after.total_params, after.unsupported) == (before.total_flops, before.total_params, [])
    assert any("1x1 convs as matmul" in n for n in gm.meta["tucker_fx.notes"])


def test_compressed_result_exports_saves_and_loads(tmp_path):
    net = _block_net()
    x = torch.randn(1, 32, 8, 16, 16)
    result = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=1.0, only_if_cheaper=False, progress=False))
    kinds = {type(m).__name__ for m in result.module.modules()}
    assert {"PointwiseConv", "NarrowConv3d" if native.available() else "MkldnnConv"} <= kinds
    assert result.validation.rel_error < 1e-5
    ep = torch.export.export(result.module, (x,))  # a plain conv in the exported graph, not mkldnn
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t or "tucker_fx" in t for t in targets)
    assert torch.allclose(ep.module()(x), result.module(x), atol=1e-5)
    path = tucker_fx.save(result, tmp_path / "net")
    loaded = tucker_fx.load(path, _block_net(), x)
    assert torch.equal(loaded.module(x), result.module(x))


def test_mkldnn_conv_runs_bfloat16_on_any_cpu() -> None:
    # mkldnn's bf16 path needs avx512bw/vl/dq or avx_ne_convert: without them (an AMD EPYC without
    # AVX-512) torch.mkldnn_convolution raises, and MkldnnConv must fall back to F.conv3d
    from tucker_fx.kernels.pointwise import MkldnnConv, mkldnn_dtypes
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 4, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 4, 6, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        y = MkldnnConv(conv)(x)
        torch.testing.assert_close(y.float(), conv(x).float(), rtol=2e-2, atol=2e-2)
    assert y.dtype == torch.bfloat16
    assert torch.float32 in mkldnn_dtypes()
    assert (torch.bfloat16 in mkldnn_dtypes()) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
