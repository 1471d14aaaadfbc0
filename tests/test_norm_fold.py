"""NormedPointwise (a norm computed from its 1x1 conv's narrow input) and the pass that places it."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import tucker_fx
from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.kernels.inplace import InplaceInstanceNorm
from tucker_fx.kernels.norm_fold import NormedPointwise, foldable_norm
from tucker_fx.kernels.pointwise import PointwiseConv
from tucker_fx.passes.norm_fold import FoldNormIntoPointwise

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _norm(kind: str, dims: int, c: int) -> nn.Module:
    if kind == "instance":
        return INSTANCE[dims](c)
    if kind == "instance_affine":
        return INSTANCE[dims](c, affine=True)
    groups = {"group1": 1, "group4": 4, "group_all": c}[kind]
    return nn.GroupNorm(groups, c)


def _randomize(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    return norm


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kind", ["instance", "instance_affine", "group1", "group4", "group_all"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_normed_pointwise_equals_conv_then_norm(dims: int, kind: str, batch: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = CONVS[dims](4, 16, 1, bias=bias)
    norm = _randomize(_norm(kind, dims, 16))
    # a mean far from zero: the variance must come from centred data, not E[y^2] - E[y]^2
    z = torch.randn(batch, 4, *([7] * dims)) * 0.1 + 3.0
    fused = NormedPointwise(PointwiseConv.from_conv(conv), norm)
    ref = norm(conv(z))
    out = fused(z)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_normed_pointwise_in_float64_is_exact_to_rounding() -> None:
    torch.manual_seed(1)
    conv, norm = nn.Conv3d(8, 32, 1).double(), _randomize(nn.GroupNorm(8, 32)).double()
    z = torch.randn(2, 8, 6, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(NormedPointwise(PointwiseConv.from_conv(conv), norm)(z), norm(conv(z)),
                               rtol=1e-11, atol=1e-11)


def test_normed_pointwise_gradients_match() -> None:
    torch.manual_seed(2)
    conv, norm = nn.Conv3d(4, 16, 1), _randomize(nn.GroupNorm(4, 16))
    fused = NormedPointwise(PointwiseConv.from_conv(conv), norm)
    z = torch.randn(2, 4, 5, 5, 5, requires_grad=True)
    target = torch.randn(2, 16, 5, 5, 5)
    (fused(z) * target).sum().backward()
    got = [z.grad.clone(), fused.weight.grad.clone(), fused.bias.grad.clone(), fused.norm_weight.grad.clone()]
    z.grad = None
    ref_conv, ref_norm = nn.Conv3d(4, 16, 1), nn.GroupNorm(4, 16)
    ref_conv.load_state_dict(conv.state_dict())
    ref_norm.load_state_dict(norm.state_dict())
    (ref_norm(ref_conv(z)) * target).sum().backward()
    want = [z.grad, ref_conv.weight.grad, ref_conv.bias.grad, ref_norm.weight.grad]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=1e-4, atol=1e-4)


def test_normed_pointwise_shares_the_parameters() -> None:
    conv, norm = nn.Conv2d(2, 8, 1), nn.GroupNorm(2, 8)
    pw = PointwiseConv.from_conv(conv)
    fused = NormedPointwise(pw, norm)
    assert fused.weight is pw.weight and fused.norm_weight is norm.weight


@pytest.mark.parametrize("bad, match", [
    (lambda: NormedPointwise(PointwiseConv.from_conv(nn.Conv2d(2, 8, 1)), nn.BatchNorm2d(8)), "GroupNorm or an InstanceNorm"),
    (lambda: NormedPointwise(PointwiseConv.from_conv(nn.Conv2d(2, 8, 1, stride=2)), nn.GroupNorm(2, 8)), "stride-1"),
    (lambda: NormedPointwise(PointwiseConv.from_conv(nn.Conv2d(2, 8, 1)), nn.GroupNorm(2, 6)), "expects 6 channels"),
    (lambda: NormedPointwise(PointwiseConv.from_conv(nn.Conv2d(2, 8, 1)),
                             nn.InstanceNorm2d(8, track_running_stats=True)), "without running statistics"),
])
def test_normed_pointwise_rejects(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bad()


def test_foldable_norm() -> None:
    assert foldable_norm(nn.GroupNorm(4, 16)) == 4
    assert foldable_norm(nn.InstanceNorm3d(16)) == 16
    assert foldable_norm(InplaceInstanceNorm(nn.InstanceNorm3d(16))) == 16
    assert foldable_norm(nn.InstanceNorm3d(16, track_running_stats=True)) is None
    assert foldable_norm(nn.BatchNorm3d(16)) is None
    assert foldable_norm(nn.LayerNorm(16)) is None


class _Unit(nn.Module):
    """conv 1x1 -> norm -> act, with an optional second reader of the conv's output."""

    def __init__(self, cin: int, cout: int, norm: nn.Module, tap: bool = False) -> None:
        super().__init__()
        self.conv, self.norm, self.tap = nn.Conv3d(cin, cout, 1), norm, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = F.relu(self.norm(y))
        return out + y if self.tap else out


def _traced(net: nn.Module) -> fx.GraphModule:
    gm = fx.symbolic_trace(net)
    setattr(gm, "conv", PointwiseConv.from_conv(net.conv))  # as fast_kernels leaves a 1x1 conv
    gm.recompile()
    return gm


@pytest.mark.parametrize("cin, cout, tap, applies", [
    (4, 16, False, True),     # widening x4: folded
    (8, 16, False, True),     # x2: folded
    (12, 16, False, False),   # less than x2: the statistics cost more than they save
    (4, 16, True, False),     # the conv's output has another reader: it must exist
])
def test_pass_applies_where_it_pays_and_is_safe(cin: int, cout: int, tap: bool, applies: bool) -> None:
    torch.manual_seed(3)
    net = _Unit(cin, cout, _randomize(nn.GroupNorm(4, cout)), tap).eval()
    x = torch.randn(2, cin, 5, 6, 7)
    gm = _traced(net)
    ref = net(x)
    result = FoldNormIntoPointwise()(gm)
    assert result.modified is applies
    assert any(isinstance(m, NormedPointwise) for m in gm.modules()) is applies
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-4)


def test_pass_folds_a_shared_pair_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv3d(4, 16, 1), nn.InstanceNorm3d(16)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)) + self.norm(self.conv(y))

    torch.manual_seed(4)
    net = Twice().eval()
    x, y = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 4, 4, 4)
    gm = _traced(net)
    ref = net(x, y)
    assert FoldNormIntoPointwise()(gm).modified
    fused = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), NormedPointwise)]
    assert len(fused) == 2 and len({n.target for n in fused}) == 1
    torch.testing.assert_close(gm(x, y), ref, rtol=1e-4, atol=1e-4)


def test_compress_folds_the_norms_of_a_decomposed_unit() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv3d(16, 32, 3, padding=1), nn.InstanceNorm3d(32, affine=True), nn.LeakyReLU(inplace=True),
                        nn.Conv3d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU()).eval()
    x = torch.randn(1, 16, 8, 8, 8)
    r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=1.0, only_if_cheaper=False, progress=False,
                                                                 tuning_cache=False))
    assert sum(isinstance(m, NormedPointwise) for m in r.module.modules()) == 0  # full rank: nothing widens
    r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, tuning_cache=False))
    assert sum(isinstance(m, NormedPointwise) for m in r.module.modules()) == 2
    assert "norms computed from their 1x1 conv's input" in " ".join(r.module.meta.get(NOTES_KEY, []))
    plain = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, lowering="none"))
    assert not any(isinstance(m, NormedPointwise) for m in plain.module.modules())
    with torch.no_grad():  # the same factors, the norms computed the other way
        torch.testing.assert_close(r.module(x), plain.module(x), rtol=1e-4, atol=1e-4)
