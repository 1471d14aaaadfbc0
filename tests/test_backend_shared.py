"""backend="tucker" when Dynamo shares one graph between module instances, and on models with
their own ``__getattr__`` (issue 11, points 1 and 2; repros shared_code, two_instances,
getattr_backend)."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn as nn

import tucker_fx
from tucker_fx.backend.dynamo import _parse_source, tucker_backend

FULL = {"rank": 1.0, "only_if_cheaper": False, "inner": "eager"}
LEAN = {**FULL, "lowering": "none", "hooi_iters": 0, "merge": False, "validate": False}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Block(nn.Module):
    """A conv, a graph break, then a GroupNorm: Dynamo compiles each half once for all instances."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._dynamo.graph_break()
        return torch.relu(self.norm(y)) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


def _blocks(n: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(n)]).eval()
    with torch.no_grad():  # distinct norm affines, so that a baked-in norm would be wrong too
        for block in model:
            block.norm.weight.uniform_(0.5, 2.0)
            block.norm.bias.uniform_(-1.0, 1.0)
    return model


def _recording(options: dict[str, Any], graphs: list) -> Any:
    """A backend that runs tucker_backend and keeps what it returns."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        compiled = tucker_backend(gm, example_inputs, options=options)
        graphs.append(compiled)
        return compiled

    return backend


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_repeated_blocks_sharing_a_graph_use_their_own_weights(inner: str) -> None:
    model = _blocks()
    x = torch.randn(1, 4, 8, 8)
    reports: list = []
    fast = torch.compile(model, backend="tucker", options={**LEAN, "inner": inner, "on_report": reports.append})
    with torch.no_grad():
        ref, out = model(x), fast(x)
        again = fast(x)
    assert rel(out, ref) < 1e-5
    assert torch.equal(again, out)
    assert len(reports) == 3  # one compressed variant per block, none compressed again on the second call


def test_two_models_of_one_class_compiled_in_one_process() -> None:
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    x = torch.randn(1, 3, 8, 8)
    ca = torch.compile(a, backend="tucker", options=LEAN)
    cb = torch.compile(b, backend="tucker", options=LEAN)
    with torch.no_grad():
        ya, yb, ya2 = ca(x), cb(x), ca(x)
        assert rel(ya, a(x)) < 1e-5
        assert rel(yb, b(x)) < 1e-5
        assert rel(ya2, a(x)) < 1e-5


def test_each_instance_at_rank_half_equals_compress_of_that_instance() -> None:
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    x = torch.randn(1, 3, 8, 8)
    opts = {"rank": 0.5, "only_if_cheaper": False, "inner": "eager"}
    reports: list = []
    ca = torch.compile(a, backend="tucker", options={**opts, "on_report": reports.append})
    cb = torch.compile(b, backend="tucker", options={**opts, "on_report": reports.append})
    config = tucker_fx.TuckerConfig(rank=0.5, only_if_cheaper=False, progress=False)
    with torch.no_grad():
        for compiled, model in ((ca, a), (cb, b)):
            alone = tucker_fx.compress(model, x, config=config)
            out, want = compiled(x), alone.module(x)
            assert rel(out, want) < 1e-5, "through the backend, not the instance's own compression"
            assert rel(out, model(x)) > 1e-3  # really compressed: the check above can fail
    assert [sorted((e.name, e.ranks) for e in r.plan.applied) for r in reports] == \
        [sorted((e.name, e.ranks) for e in alone.plan.applied)] * 2


def test_shared_blocks_at_rank_half_equal_compress_of_each_block() -> None:
    model = _blocks(2)
    x = torch.randn(1, 4, 8, 8)
    opts = {"rank": 0.5, "only_if_cheaper": False, "inner": "eager"}
    config = tucker_fx.TuckerConfig(rank=0.5, only_if_cheaper=False, progress=False)
    fast = torch.compile(model, backend="tucker", options=opts)
    with torch.no_grad():
        out = fast(x)
        want = x
        for block in model:  # each block compressed on its own, at its own input
            want = tucker_fx.compress(block, want, config=config).module(want)
    assert rel(out, want) < 1e-5
    assert rel(out, model(x)) > 1e-3


def test_same_weights_are_compressed_once_and_freed_models_drop_their_variant() -> None:
    graphs: list = []
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    x = torch.randn(1, 3, 8, 8)
    backend = _recording(LEAN, graphs)
    with torch.no_grad():
        for _ in range(3):
            torch.compile(a, backend=backend)(x)
        torch.compile(b, backend=backend)(x)
    (graph,) = graphs
    assert graph.compressions == 2 and len(graph._variants) == 2
    del b
    gc.collect()
    assert len(graph._variants) == 1, "a freed model's variant should be dropped, not kept alive"


def test_more_live_weight_sets_than_max_variants_raises() -> None:
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    x = torch.randn(1, 3, 8, 8)
    opts = {**LEAN, "max_variants": 1}
    with torch.no_grad():
        torch.compile(a, backend="tucker", options=opts)(x)
        with pytest.raises(RuntimeError, match="max_variants=1"):
            torch.compile(b, backend="tucker", options=opts)(x)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_bad_max_variants_is_refused(bad: Any) -> None:
    with pytest.raises(Exception, match="max_variants"):
        torch.compile(Net().eval(), backend="tucker", options={**LEAN, "max_variants": bad})(torch.randn(1, 3, 8, 8))


def test_weights_changed_in_place_are_compressed_again() -> None:
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    x = torch.randn(1, 3, 8, 8)
    reports: list = []
    fast = torch.compile(a, backend="tucker", options={**LEAN, "on_report": reports.append})
    with torch.no_grad():
        fast(x)
        a.load_state_dict(b.state_dict())  # copies in place: same tensors, new values
        with pytest.warns(RuntimeWarning, match="changed in place"):
            out = fast(x)
        assert rel(out, b(x)) < 1e-5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(fast(x), out)  # unchanged since: no new compression, no warning
    assert len(reports) == 2


def test_shared_blocks_through_a_batch_change_dynamic() -> None:
    model = _blocks(2)
    reports: list = []
    fast = torch.compile(model, backend="tucker", options={**LEAN, "inner": "aot_eager", "on_report": reports.append})
    with torch.no_grad():
        for batch in (1, 2, 3, 2):
            x = torch.randn(batch, 4, 8, 8)
            assert rel(fast(x), model(x)) < 1e-5, f"batch {batch}"
    assert len(reports) == 4  # 2 blocks x (static graph, then the graph dynamic in the batch)


@pytest.mark.slow
def test_repeated_blocks_inductor() -> None:
    model = _blocks(2)
    x = torch.randn(1, 4, 8, 8)
    fast = torch.compile(model, backend="tucker", options={**LEAN, "inner": "inductor"})
    with torch.no_grad():
        assert rel(fast(x), model(x)) < 1e-4


# -- models with their own __getattr__ (diffusers' ModelMixin) --------------------------------------------


class _WithGetattr(nn.Module):
    def __getattr__(self, name: str) -> Any:
        return super().__getattr__(name)


class _Inner(_WithGetattr):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.register_buffer("scale", torch.full((1, 16, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) * self.scale


class _GetattrNet(_WithGetattr):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Inner()])
        self.out = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.out(x))


def test_dict_spelled_sources_name_parameters_and_buffers() -> None:
    root = "L['self'].__dict__['_modules']['blocks']._modules['0'].__dict__"
    assert _parse_source(f"{root}['_modules']['conv']._parameters['weight']") == ("blocks.0.conv.weight", True)
    assert _parse_source(f"{root}['_buffers']['scale']") == ("blocks.0.scale", True)
    assert _parse_source("L['self'].__dict__['_parameters']['p']") == ("p", True)
    assert _parse_source("L['self'].__dict__['w']") == ("w", False)
    assert _parse_source("G['m'].__dict__['_modules']['c']._parameters['bias']") == ("m.c.bias", True)


def test_model_with_getattr_decomposes_what_compress_does() -> None:
    torch.manual_seed(0)
    model = _GetattrNet().eval()
    x = torch.randn(1, 8, 8, 8)
    opts = {"rank": 0.5, "only_if_cheaper": False, "inner": "eager"}
    reports: list = []
    fast = torch.compile(model, backend="tucker", options={**opts, "on_report": reports.append})
    config = tucker_fx.TuckerConfig(rank=0.5, only_if_cheaper=False, progress=False)
    alone = tucker_fx.compress(model, x, config=config)
    with torch.no_grad():
        out = fast(x)
        assert rel(out, alone.module(x)) < 1e-5
    (report,) = reports
    applied = sorted((e.name, e.ranks) for e in report.plan.applied)
    assert applied == sorted((e.name, e.ranks) for e in alone.plan.applied)
    assert {name for name, _ in applied} == {"blocks.0.conv", "out", "head.1"}
    assert report.after.total_params < report.before.total_params
