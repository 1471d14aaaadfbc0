"""torch.compile(backend="tucker") and torch.export: the same pipeline on compiler graphs."""

from __future__ import annotations

import importlib.metadata
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.exc import BackendCompilerFailed

import tucker_fx
from tucker_fx.analysis.capture import capture_model
from tucker_fx.backend.dynamo import _parse_source, _qualified_name
from tucker_fx.models import TEST_MODELS, THETIS_INPUT_SHAPE, thetis_net
from tucker_fx.models.video import VIDEO_MODELS

FULL = {"rank": 1.0, "only_if_cheaper": False, "inner": "eager"}
LEAN = {**FULL, "lowering": "none", "hooi_iters": 0, "merge": False}  # the same path, less work


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
    assert _qualified_name("G['model']._modules['c']._parameters['weight']") == "model.c.weight"
    assert _qualified_name("G['nets']['unet']._buffers['mean']") == "nets.unet.mean"
    assert _qualified_name("L['self'].w") is None  # a plain attribute: lifted only when a layer uses it as weight
    assert _parse_source("L['self'].w") == ("w", False) and _parse_source("G['W']") == ("W", False)
    assert _qualified_name("L['xs'][0]") is None and _qualified_name("L['args'][0].size()[0]") is None


@pytest.mark.slow  # a fresh Python process
def test_compiles_in_a_fresh_process_that_never_imports_tucker_fx():
    code = textwrap.dedent("""
        import sys, torch, torch.nn as nn
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        assert "tucker_fx" not in sys.modules
        fast = torch.compile(net, backend="tucker", options={"rank": 1.0, "only_if_cheaper": False, "inner": "eager"})
        x = torch.randn(1, 3, 12, 12)
        with torch.no_grad():
            err = ((fast(x) - net(x)).norm() / net(x).norm()).item()
        print("tucker_fx" in sys.modules, err < 1e-4)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]  # loaded through the entry point, and right


@pytest.mark.slow  # inductor compile
def test_default_inner_is_inductor_and_matches_eager():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    reports = []
    fast = torch.compile(net, backend="tucker", options={"rank": 1.0, "only_if_cheaper": False,
                                                           "on_report": reports.append})
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        assert rel(net(x), fast(x)) < 1e-4
    assert [e.name for e in reports[0].plan.applied] == ["0", "2"]


def test_vbmf_rank_through_the_backend_reports_fewer_params_and_flops():
    factory, shape = TEST_MODELS["conv1d"]
    reports = []
    fast = torch.compile(factory(), backend="tucker", options={"rank": "vbmf", "inner": "eager",
                                                                 "on_report": reports.append})
    with torch.no_grad():
        fast(torch.randn(shape))
    (r,) = reports
    assert r.plan.applied and all(e.rank_source == "vbmf" for e in r.plan.applied)
    assert r.after.total_params < r.before.total_params and r.after.total_flops < r.before.total_flops
    assert r.validation is not None and math.isfinite(r.validation.rel_error)


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_full_rank_matches_eager(name):
    factory, shape = TEST_MODELS[name]
    model = factory()
    x = torch.randn(shape)
    reports = []
    fast = torch.compile(model, backend="tucker", options={**FULL, "on_report": reports.append})
    with torch.no_grad():
        assert rel(model(x), fast(x)) < 1e-4
    assert reports and any(r.plan.applied for r in reports)


@pytest.mark.slow  # full-size video models
@pytest.mark.parametrize("name", sorted(VIDEO_MODELS))
def test_symbolic_trace_fails_but_backend_compresses(name):
    factory, shape = VIDEO_MODELS[name]
    model = factory()
    with pytest.raises(tucker_fx.UntraceableModelError):  # symbolic_trace alone cannot (compress exports it)
        capture_model(model, (torch.randn(shape),), path="symbolic_trace")
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


@pytest.mark.slow  # over 5 s
def test_batch_size_change_recompiles_and_stays_right():
    model = TEST_MODELS["conv2d"][0]()
    reports = []
    fast = torch.compile(model, backend="tucker", options={**FULL, "on_report": reports.append})
    for batch in (2, 5):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert rel(model(x), fast(x)) < 1e-4
    assert len(reports) >= 1


@pytest.mark.slow  # full-size video models, 20-40 s
@pytest.mark.parametrize("name", sorted(VIDEO_MODELS))
def test_video_models_full_rank_match_eager_across_a_batch_change(name):
    # the recompile for batch 2 is dynamic in the batch: Dynamo passes it as a SymInt input
    factory, shape = VIDEO_MODELS[name]
    model = factory()
    reports = []
    fast = torch.compile(model, backend="tucker", options={**FULL, "on_report": reports.append})
    with torch.no_grad():
        for batch in (1, 2, 3):
            x = torch.randn((batch, *shape[1:]))
            assert rel(model(x), fast(x)) < 1e-4
    assert len(reports) == 2 and all(r.plan.applied and r.validation.rel_error < 1e-4 for r in reports)


def test_aten_spelled_layers_are_found_by_the_shared_site_adapter():
    # compiling an exported program's module: Dynamo sees aten.conv2d, which site_of knows
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    reports = []
    fast = torch.compile(torch.export.export(net, (x,)).module(), backend="tucker",
                         options={**FULL, "on_report": reports.append})
    with torch.no_grad():
        assert rel(net(x), fast(x)) < 1e-4
    assert [e.name for e in reports[0].plan.applied] == ["0", "2"]


class NormNet(nn.Module):
    """Conv, BatchNorm, GroupNorm, conv, LayerNorm, linear: float attributes on every norm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.gn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8)
        self.c2, self.ln, self.fc = nn.Conv2d(8, 8, 3), nn.LayerNorm(36), nn.Linear(36, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(self.c2(self.gn(self.bn(self.c1(x)))).flatten(2)))


def test_dynamic_true_with_norm_layers_matches_eager():
    model = NormNet().eval()
    reports = []
    fast = torch.compile(model, backend="tucker", dynamic=True, options={**LEAN, "on_report": reports.append})
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 10, 10)
            assert rel(model(x), fast(x)) < 1e-4
    assert len(reports) == 1  # one dynamic graph for every batch
    assert [e.name for e in reports[0].plan.applied] == ["c1", "c2", "fc"]

    def scaled(x: torch.Tensor, s: float) -> torch.Tensor:  # a number input, not an attribute
        return model(x) * s

    torch._dynamo.reset()
    with pytest.raises(BackendCompilerFailed, match="dynamic=False"):
        torch.compile(scaled, backend="tucker", dynamic=True, options=LEAN)(torch.randn(2, 3, 10, 10), 0.5)


class OddWeights(nn.Module):
    """A plain tensor attribute as a weight, a conv module, a weight computed in forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.randn(8, 3, 3, 3)
        self.c = nn.Conv2d(8, 8, 1)
        self.g, self.v = nn.Parameter(torch.rand(8, 1, 1, 1)), nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.c(F.conv2d(x, self.w)), self.g * self.v)


_GLOBAL_NETS: dict = {}


def _through_a_global(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(_GLOBAL_NETS["odd"](x), w)


def test_weights_from_globals_attributes_and_forward_do_not_break_the_compile():
    model = OddWeights().eval()
    x = torch.randn(1, 3, 12, 12)
    reports = []
    fast = torch.compile(model, backend="tucker", options={**LEAN, "on_report": reports.append})
    with torch.no_grad():
        assert rel(model(x), fast(x)) < 1e-4
    plan = reports[0].plan
    assert [e.name for e in plan.applied] == ["conv2d", "c"]  # the tensor attribute and the module
    (computed,) = [e for e in plan if not e.applied]
    assert "computed in forward" in computed.reason

    _GLOBAL_NETS["odd"] = model
    torch._dynamo.reset()
    reports.clear()
    fast = torch.compile(_through_a_global, backend="tucker", options={**LEAN, "on_report": reports.append})
    with torch.no_grad():
        for _ in range(2):  # the weight that is an input is not baked in
            w = torch.randn(4, 8, 1, 1)
            assert rel(_through_a_global(x, w), fast(x, w)) < 1e-4
    plan = reports[0].plan
    assert [e.name for e in plan.applied] == ["conv2d", "_GLOBAL_NETS.odd.c"]
    assert sorted(e.reason.split(",")[0] for e in plan if not e.applied) == [
        "its weight is a graph input", "its weight is computed in forward (node 'mul')"]


def test_on_report_only_for_graphs_with_a_layer():
    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            x = self.conv(x)
            torch._dynamo.graph_break()
            return torch.relu(x) + 1

    reports = []
    fast = torch.compile(Tail().eval(), backend="tucker", options={**FULL, "on_report": reports.append})
    with torch.no_grad():
        fast(torch.randn(1, 3, 8, 8))
    assert len(reports) == 1 and [e.name for e in reports[0].plan.applied] == ["conv"]


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
    with pytest.raises(BackendCompilerFailed, match=r"ValueError: unknown option\(s\) \['rnak'\]"):
        torch.compile(model, backend="tucker", options={"rnak": 2})(torch.randn(1, 3, 8, 8))
    torch._dynamo.reset()
    with pytest.raises(BackendCompilerFailed, match="ValueError: backend='tucker' option inner: expected one of"):
        torch.compile(model, backend="tucker", options={"inner": "tvm"})(torch.randn(1, 3, 8, 8))
    torch._dynamo.reset()
    with pytest.raises(BackendCompilerFailed, match="ValueError: backend='tucker' option inductor:"):
        torch.compile(model, backend="tucker", options={"inductor": True})(torch.randn(1, 3, 8, 8))


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


@pytest.mark.slow  # full-size THETIS
def test_fft_lowered_model_exports():
    x = torch.randn(THETIS_INPUT_SHAPE)
    from tucker_fx.models import thetis_paper_config

    result = tucker_fx.compress(thetis_net(), x, config=thetis_paper_config(validate=False))
    assert result.plan["c1"].lowering == "fft"
    ep = torch.export.export(result.module, (x,))
    assert torch.allclose(ep.module()(x), result.module(x), rtol=1e-5, atol=1e-6)


def test_exported_program_keeps_its_dynamic_batch_and_its_example_inputs(tmp_path):
    model = TEST_MODELS["residual3d"][0]()
    x = torch.randn(TEST_MODELS["residual3d"][1])
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    result = tucker_fx.compress(ep, config=tucker_fx.TuckerConfig(rank=0.5))  # inputs: ep.example_inputs
    assert result.after.total_params < result.before.total_params
    (bounds,) = result.exported.range_constraints.values()
    assert bounds.upper == 64
    x3 = torch.randn((3, *x.shape[1:]))
    assert torch.allclose(result.exported.module()(x3), result.module(x3), rtol=1e-5, atol=1e-6)
    path = tmp_path / "dynamic.pt2"
    torch.export.save(result.exported, path)
    assert torch.equal(torch.export.load(path).module()(x3), result.exported.module()(x3))


def test_apply_plan_and_lower_accept_an_exported_program():
    model = TEST_MODELS["residual3d"][0]()
    x = torch.randn(TEST_MODELS["residual3d"][1])
    ep = torch.export.export(model, (x,))
    first = tucker_fx.compress(model, x, config=tucker_fx.TuckerConfig(rank=0.5, validate=False))
    again = tucker_fx.apply_plan(ep, first.plan, config=tucker_fx.TuckerConfig(validate=False))
    assert isinstance(again.exported, torch.export.ExportedProgram)
    assert [(e.name, e.ranks) for e in again.plan.applied] == [(e.name, e.ranks) for e in first.plan.applied]
    lowered = tucker_fx.lower(ep, tune=False, tuning_cache=False)
    assert rel(model(x), lowered(x)) < 1e-5
    with pytest.raises(TypeError, match="ExportedProgram"):
        tucker_fx.lower("model", x)
