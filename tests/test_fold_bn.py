"""BatchNorm folding on every graph spelling: modules (traced), aten (exported), functional (Dynamo)."""

import pytest
import torch
import torch._dynamo
import torch.nn as nn

import tucker_fx
from tucker_fx.passes.fold_bn import FoldBatchNorm


def _net(bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv3d(3, 8, 3, bias=bias), nn.BatchNorm3d(8), nn.ReLU(),
                      nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8)).eval()
    for bn in (m[1], m[4]):  # statistics far from identity, so an unfolded BN shows
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return m


X = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bias", [False, True])
def test_exported_graph_batch_norms_are_folded_exactly(bias):
    model = _net(bias)
    gm = torch.export.export(model, (X,), strict=False).module()
    result = FoldBatchNorm()(gm)
    gm.recompile()
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert result.modified and not any("batch_norm" in t for t in targets), targets
    with torch.no_grad():
        ref, out = model(X), gm(X)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_training_mode_functional_batch_norm_is_left_with_a_note():
    model = _net().train()
    gm = torch.export.export(model, (X,), strict=False).module()
    FoldBatchNorm()(gm)
    assert any("batch_norm" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def test_shared_weight_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
            self.bn = nn.BatchNorm2d(4).eval()
            self.bn.running_mean.fill_(3.0)

        def forward(self, x):
            return self.bn(torch.conv2d(x, self.w)) + torch.conv2d(x, self.w)

    model = Shared().eval()
    x = torch.randn(1, 4, 5, 5)
    gm = torch.export.export(model, (x,), strict=False).module()
    FoldBatchNorm()(gm)
    gm.recompile()
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert any("batch_norm" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def test_backend_folds_functional_batch_norm_like_compress():
    """Dynamo graphs call F.batch_norm: unfolded, the backend decomposed other weights than compress."""
    model = _net(bias=True)
    config = tucker_fx.TuckerConfig(rank=0.5, progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="tucker", options={"rank": 0.5, "inner": "eager", "progress": False})
    with torch.no_grad():
        out = compiled(X)
        alone = tucker_fx.compress(model, X, config=config).module(X)
    torch._dynamo.reset()
    assert ((out - alone).norm() / alone.norm()).item() < 1e-5
