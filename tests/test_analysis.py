"""The analysis pass: exact counts on the paper's net, FlopCounterMode as oracle, bad input."""

from __future__ import annotations

import itertools
import zlib
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tucker_fx
from tucker_fx.analysis import COST_KEY, REGISTRY, CostRegistry, capture, propagate_shapes, annotate_costs
from tucker_fx.cli import main as cli_main
from tucker_fx.models import THETIS_INPUT_SHAPE, TEST_MODELS, thetis_net

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def oracle_flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the paper's network: its Table 2, recomputed (docs/demo.md) -------------------------------

THETIS_ROWS = {  # layer: (params, FLOPs)
    "c1": (14_526, 15_611_904_000),
    "c2": (7_216, 161_740_800),
    "l1": (663_680, 1_327_104),
    "l2": (10_836, 21_504),
    "l3": (170, 336),
}


def test_thetis_exact_table2_counts():
    report = tucker_fx.analyze(thetis_net(), torch.empty(THETIS_INPUT_SHAPE))
    for name, (params, flops) in THETIS_ROWS.items():
        row = report.row(name)
        assert (row.params, row.flops, row.macs) == (params, flops, flops // 2), name
    assert report.total_params == 696_428
    assert report.total_flops == 15_774_993_744
    assert report.total_macs == 15_774_993_744 // 2
    assert report.unsupported == []
    assert report.row("c1").out_shape == (1, 6, 28, 120, 160)
    assert report.row("pool2").out_shape == (1, 16, 6, 6, 9)


def test_thetis_matches_oracle_on_meta_input():
    model = thetis_net()
    report = tucker_fx.analyze(model, torch.empty(THETIS_INPUT_SHAPE, device="meta"))
    meta_model = thetis_net().to("meta")
    assert report.total_flops == oracle_flops(meta_model, torch.empty(THETIS_INPUT_SHAPE, device="meta"))


# --- grid against FlopCounterMode ----------------------------------------------------------------

def _conv_cases():
    cases = []
    for dims, kernel, stride, padding, dilation, groups, bias, batch in itertools.product(
        (1, 2, 3),
        ("k1", "k3", "aniso"),
        (1, "aniso"),
        (0, "tuple", "same", "valid"),
        (1, 2),
        (1, 2),
        (True, False),
        (1, 3),
    ):
        # keep the grid fast: a deterministic thinning that still covers every value of each axis
        key = zlib.crc32(repr((dims, kernel, stride, padding, dilation, groups, bias, batch)).encode()) % 7
        if key not in (0, 1):
            continue
        if padding == "same" and stride != 1:
            continue  # PyTorch refuses 'same' with stride > 1
        cases.append((dims, kernel, stride, padding, dilation, groups, bias, batch))
    return cases


def _geometry(dims, kernel, stride, padding, dilation):
    k = {"k1": (1,) * dims, "k3": (3,) * dims, "aniso": (3, 1, 5)[:dims] if dims > 1 else (4,)}[kernel]
    s = (1,) * dims if stride == 1 else (2, 1, 3)[:dims]
    p = {0: 0, "tuple": (1, 0, 2)[:dims], "same": "same", "valid": "valid"}[padding]
    d = (dilation,) * dims if dilation == 1 else (2, 1, 3)[:dims]
    return k, s, p, d


@pytest.mark.parametrize("dims,kernel,stride,padding,dilation,groups,bias,batch", _conv_cases())
def test_conv_flops_match_oracle(dims, kernel, stride, padding, dilation, groups, bias, batch):
    k, s, p, d = _geometry(dims, kernel, stride, padding, dilation)
    conv = CONV[dims](4, 6, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    x = torch.randn(batch, 4, *((15, 12, 17)[:dims]))
    report = tucker_fx.analyze(conv, x)
    assert report.total_flops == oracle_flops(conv, x)
    assert report.total_params == unique_params(conv)
    assert [r.kind for r in report.rows] == ["input", "conv", "output"]


@pytest.mark.parametrize("dims", (1, 2, 3))
@pytest.mark.parametrize("spelling", ("module", "F", "torch"))
def test_functional_spellings_count_the_same(dims, spelling):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = CONV[dims](3, 5, 3, stride=2, padding=1)

        def forward(self, x):
            if spelling == "module":
                return self.conv(x)
            fn = {"F": (F.conv1d, F.conv2d, F.conv3d), "torch": (torch.conv1d, torch.conv2d, torch.conv3d)}
            return fn[spelling][dims - 1](x, self.conv.weight, self.conv.bias, 2, 1)

    net = Net()
    x = torch.randn(2, 3, *((9, 8, 7)[:dims]))
    report = tucker_fx.analyze(net, x)
    assert report.total_flops == oracle_flops(net, x)
    assert report.total_params == unique_params(net)
    assert sum(r.params for r in report.rows) == unique_params(net)


@pytest.mark.parametrize("dims", (1, 2, 3))
@pytest.mark.parametrize("groups", (1, 2))
def test_transposed_conv_counted_not_zero(dims, groups):
    conv = CONVT[dims](4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups)
    x = torch.randn(2, 4, *((5, 6, 7)[:dims]))
    report = tucker_fx.analyze(conv, x)
    assert report.total_flops == oracle_flops(conv, x) > 0
    assert [r.kind for r in report.rows] == ["input", "conv_transpose", "output"]


@pytest.mark.parametrize("shape", [(5, 7), (2, 5, 7), (2, 3, 4, 7)])
@pytest.mark.parametrize("bias", (True, False))
def test_linear_flops_match_oracle(shape, bias):
    lin = nn.Linear(7, 9, bias=bias)
    x = torch.randn(shape)
    report = tucker_fx.analyze(lin, x)
    assert report.total_flops == oracle_flops(lin, x)
    assert report.total_params == unique_params(lin)


@pytest.mark.parametrize("a,b", [((4, 5), (5, 6)), ((3, 4, 5), (3, 5, 6)), ((2, 3, 4, 5), (5, 6))])
def test_matmul_flops_match_oracle(a, b):
    class MM(nn.Module):
        def forward(self, x, y):
            return torch.matmul(x, y) + (x @ y)

    x, y = torch.randn(a), torch.randn(b)
    report = tucker_fx.analyze(MM(), x, y)
    with FlopCounterMode(display=False) as counter:
        MM()(x, y)
    assert report.total_flops == counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_test_architectures_match_oracle(name):
    factory, shape = TEST_MODELS[name]
    model = factory()
    x = torch.randn(shape)
    report = tucker_fx.analyze(model, x)
    assert report.total_flops == oracle_flops(model, x)
    assert report.total_params == unique_params(model)
    assert report.unsupported == []


def test_shared_weight_counted_once_in_total():
    factory, shape = TEST_MODELS["shared"]
    model = factory()
    report = tucker_fx.analyze(model, torch.randn(shape))
    shared_rows = [r for r in report.rows if r.target == "shared"]
    assert len(shared_rows) == 2 and all(r.params == 8 * 8 * 9 + 8 for r in shared_rows)
    assert report.total_params == unique_params(model)


def test_aten_graph_counts_match():
    """An aten-level graph (as torch.export / aot_autograd give) is counted like the module."""
    model = TEST_MODELS["residual3d"][0]()
    x = torch.randn(TEST_MODELS["residual3d"][1])
    ep = torch.export.export(model, (x,))
    gm = ep.module()
    report = tucker_fx.analyze(gm, x)
    assert report.total_flops == oracle_flops(model, x)
    assert report.unsupported == []


def test_records_written_to_node_meta():
    gm = capture(thetis_net())
    propagate_shapes(gm, (torch.empty(THETIS_INPUT_SHAPE),))
    report = annotate_costs(gm)
    c1 = next(n for n in gm.graph.nodes if n.target == "c1")
    assert c1.meta[COST_KEY] == report.row("c1")
    assert c1.meta["tensor_meta"].shape == (1, 6, 28, 120, 160)


def test_report_serialises():
    report = tucker_fx.analyze(thetis_net(), torch.empty(THETIS_INPUT_SHAPE))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["total_flops"] == 15_774_993_744
    assert [r["name"] for r in data["rows"]][:2] == ["x", "c1"]
    md = report.to_markdown()
    assert "15,774,993,744" in md and "| c1 | conv |" in md
    groups = report.by_module()
    assert groups["c1"]["params"] == 14_526


def test_unsupported_op_listed_not_zero():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x).abs()

    report = tucker_fx.analyze(Odd(), torch.randn(2, 8))
    assert any("rfft" in u for u in report.unsupported)
    assert "No cost formula for" in report.to_markdown()


def test_registry_refuses_duplicates():
    reg = CostRegistry()
    reg.add(nn.Conv2d, lambda ctx: None)
    with pytest.raises(ValueError, match="registered already"):
        reg.add(nn.Conv2d, lambda ctx: None)
    assert nn.Conv3d in REGISTRY and F.conv3d in REGISTRY


def test_subclass_of_conv_uses_conv_formula():
    class MyConv(nn.Conv2d):
        pass

    conv = MyConv(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    assert tucker_fx.analyze(conv, x).total_flops == oracle_flops(conv, x)


# --- the user's model is never touched --------------------------------------------------------

def test_model_not_mutated():
    model = TEST_MODELS["residual3d"][0]().train()
    calls = []
    model.conv1.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    tucker_fx.analyze(model, torch.randn(TEST_MODELS["residual3d"][1]))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN counters too
    assert model.training and model.bn1.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert len(model.conv1._forward_hooks) == 1 and calls == []


def test_graph_module_input_not_mutated():
    gm = torch.fx.symbolic_trace(thetis_net())
    tucker_fx.analyze(gm, torch.empty(THETIS_INPUT_SHAPE))
    assert all(COST_KEY not in n.meta and "tensor_meta" not in n.meta for n in gm.graph.nodes)


# --- bad input -------------------------------------------------------------------------------

class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_untraceable_model_error_names_construct_and_remedies():
    with pytest.raises(tucker_fx.UntraceableModelError) as info:
        tucker_fx.analyze(ControlFlow(), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "ControlFlow" in msg and "control flow" in msg
    assert "if x.sum() > 0" in msg  # the offending line
    assert "concrete_args" in msg and "leaf_modules" in msg and "backend='tucker'" in msg
    assert isinstance(info.value, ValueError)


def test_leaf_modules_remedy_works():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ControlFlow()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.inner(self.conv(x))

    report = tucker_fx.analyze(Outer(), torch.randn(1, 3, 8, 8), leaf_modules=[ControlFlow])
    assert any("inner" in u for u in report.unsupported)  # counted as unknown, not as 0


def test_wrong_input_shape_names_node_and_shapes():
    with pytest.raises(tucker_fx.ShapePropagationError) as info:
        tucker_fx.analyze(thetis_net(), torch.empty(1, 3, 28, 120, 160))
    msg = str(info.value)
    assert "'c1'" in msg and "[1, 3, 28, 120, 160]" in msg and "4" in msg


def test_wrong_input_count():
    with pytest.raises(ValueError, match="takes 1 input"):
        tucker_fx.analyze(thetis_net(), torch.empty(THETIS_INPUT_SHAPE), torch.empty(1))


@pytest.mark.parametrize("bad", [None, "model", torch.randn(2)])
def test_non_module_is_type_error(bad):
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        tucker_fx.analyze(bad, torch.randn(1))


def test_no_inputs_is_value_error():
    with pytest.raises(ValueError, match="needs example inputs"):
        tucker_fx.analyze(thetis_net())


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_analyze_markdown_and_json(capsys):
    assert cli_main(["analyze", "thetis"]) == 0
    assert "15,774,993,744" in capsys.readouterr().out
    assert cli_main(["analyze", "thetis", "--input-shape", "1,4,28,120,160", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == 696_428


def test_cli_factory_spec_and_errors(capsys):
    assert cli_main(["analyze", "tucker_fx.models:thetis_net", "--input-shape", "1,4,28,120,160"]) == 0
    capsys.readouterr()
    assert cli_main(["analyze", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
