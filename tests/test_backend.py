"""torch.compile(backend="tucker") and torch.export: the same pipeline on compiler graphs."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
import torch._dynamo
import torch.nn as nn

import tucker_fx
from tucker_fx.backend.dynamo import _qualified_name
from tucker_fx.models import TEST_MODELS, THETIS_INPUT_SHAPE, thetis_net
from tucker_fx.models.video import VIDEO_MODELS

FULL = {"rank": 1.0, "only_if_cheaper": False, "inner": "eager"}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel(a, b):
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


def test_entry_point_registered():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "tucker" in names
    assert "tucker" in torch._dynamo.list_backends(exclude_tags=())


def test_qualified_names_from_sources():
    assert _qualified_name("L['self']._modules['layer1']._modules['0']._modules['conv1']._parameters['weight']") == \
        "layer1.0.conv1.weight"
    assert _qualified_name("L['fn']._modules['0']._parameters['bias']") == "0.bias"
    assert _qualified_name("L['x']") is None


@pytest.mark.parametrize("name", sorted(TEST_MODELS) + sorted(VIDEO_MODELS))
def test_full_rank_matches_eager(name):
    factory, shape = {**TEST_MODELS, **VIDEO_MODELS}[name]
    model = factory()
    x = torch.randn(shape)
    reports = []
    fast = torch.compile(model, backend="tucker", options={**FULL, "on_report": reports.append})
    with torch.no_grad():
        assert rel(model(x), fast(x)) < 1e-4
    assert reports and any(r.plan.applied for r in reports)


@pytest.mark.parametrize("name", sorted(VIDEO_MODELS))
def test_symbolic_trace_fails_but_backend_compresses(name):
    factory, shape = VIDEO_MODELS[name]
    model = factory()
    with pytest.raises(tucker_fx.UntraceableModelError):
        tucker_fx.analyze(model, torch.randn(shape))
    reports = []
    fast = torch.compile(model, backend="tucker", options={"rank": 0.5, "inner": "eager", "on_report": reports.append})
    x = torch.randn(shape)
    with torch.no_grad():
        out = fast(x)
    assert out.shape == model(x).shape
    before = sum(r.before.total_params for r in reports)
    after = sum(r.after.total_params for r in reports)
    assert after < before
    assert sum(r.after.total_flops for r in reports) < sum(r.before.total_flops for r in reports)
    assert all(r.validation is not None and math.isfinite(r.validation.rel_error) for r in reports)


def test_per_layer_overrides_use_qualified_names():
    model = TEST_MODELS["residual3d"][0]()
    reports = []
    fast = torch.compile(model, backend="tucker", options={
        "ranks": {"conv2": (4, 5), "stem": None}, "inner": "eager", "on_report": reports.append})
    fast(torch.randn(TEST_MODELS["residual3d"][1]))
    plan = reports[0].plan
    assert plan["conv2"].ranks == (4, 5) and not plan["stem"].applied


def test_batch_size_change_recompiles_and_stays_right():
    model = TEST_MODELS["conv2d"][0]()
    reports = []
    fast = torch.compile(model, backend="tucker", options={**FULL, "on_report": reports.append})
    for batch in (2, 5):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert rel(model(x), fast(x)) < 1e-4
    assert len(reports) >= 1


def test_aot_eager_inner_and_graph_breaks():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(torch.relu(x))

    model = Breaks().eval()
    reports = []
    fast = torch.compile(model, backend="tucker", options={**FULL, "inner": "aot_eager", "on_report": reports.append})
    x = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        assert rel(model(x), fast(x)) < 1e-4
    assert len(reports) == 2  # one per graph


def test_bad_options_name_the_allowed_ones():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(model, backend="tucker", options={"rnak": 2})(torch.randn(1, 3, 8, 8))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="inner"):
        torch.compile(model, backend="tucker", options={"inner": "tvm"})(torch.randn(1, 3, 8, 8))


# --- torch.export ------------------------------------------------------------------------------------

def test_exported_program_compressed_and_round_trips(tmp_path):
    model = TEST_MODELS["residual3d"][0]()
    x = torch.randn(TEST_MODELS["residual3d"][1])
    ep = torch.export.export(model, (x,))
    result = tucker_fx.compress(ep, x, config=tucker_fx.TuckerConfig(rank=1.0, only_if_cheaper=False))
    assert isinstance(result.exported, torch.export.ExportedProgram)
    assert [e.name for e in result.plan.applied][:3] == ["stem", "conv1", "conv2"]
    assert rel(model(x), result.module(x)) < 1e-5
    path = tmp_path / "tucker.pt2"
    torch.export.save(result.exported, path)
    loaded = torch.export.load(path)
    assert torch.equal(loaded.module()(x), result.exported.module()(x))


def test_fft_lowered_model_exports():
    x = torch.randn(THETIS_INPUT_SHAPE)
    from tucker_fx.models import thetis_paper_config

    result = tucker_fx.compress(thetis_net(), x, config=thetis_paper_config(validate=False))
    assert result.plan["c1"].lowering == "fft"
    ep = torch.export.export(result.module, (x,))
    assert torch.allclose(ep.module()(x), result.module(x), rtol=1e-5, atol=1e-6)
