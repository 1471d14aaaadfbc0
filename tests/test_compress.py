"""compress / apply_plan / validate: exactness at full rank, Table 2, plans, bad input."""

from __future__ import annotations

import dataclasses
import itertools
import zlib
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tucker_fx
from tucker_fx import Plan, TuckerConfig
from tucker_fx.analysis import SITE_KEY
from tucker_fx.models import TEST_MODELS, THETIS_INPUT_SHAPE, thetis_net, thetis_paper_config

# decomposition alone: the lowering passes have their own tests (test_passes.py)
FULL = TuckerConfig(rank=1.0, only_if_cheaper=False, lowering="none", merge=False)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


# --- exactness at full rank ---------------------------------------------------------------------

def _grid():
    axes = dict(
        dims=(1, 2, 3), kernel=("k1", "aniso"), stride=(1, "aniso"), padding=(0, "tuple", "same"),
        dilation=(1, "aniso"), mode=("zeros", "reflect", "circular"), bias=(True, False),
    )
    cases = []
    for combo in itertools.product(*axes.values()):
        case = dict(zip(axes, combo))
        if case["padding"] == "same" and case["stride"] != 1:
            continue
        if zlib.crc32(repr(combo).encode()) % 5:  # thin the grid deterministically; every value still appears
            continue
        cases.append(tuple(combo))
    return cases


@pytest.mark.parametrize("dims,kernel,stride,padding,dilation,mode,bias", _grid())
def test_full_rank_is_exact(dims, kernel, stride, padding, dilation, mode, bias):
    k = (1,) * dims if kernel == "k1" else (3, 1, 4)[:dims] if dims > 1 else (4,)
    s = (1,) * dims if stride == 1 else (2, 1, 3)[:dims]
    p = {0: 0, "tuple": (1, 0, 2)[:dims], "same": "same"}[padding]
    d = (1,) * dims if dilation == 1 else (2, 1, 2)[:dims]
    conv = CONV[dims](5, 7, k, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode).eval()
    x = torch.randn(3, 5, *((11, 10, 12)[:dims]))
    result = tucker_fx.compress(conv, x, config=FULL)
    assert result.plan.applied, result.plan.to_markdown()
    assert rel(conv(x), result.module(x)) < 1e-5
    assert result.validation.rel_error < 1e-5


@pytest.mark.parametrize("policy", ["paper", "auto"])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("lowering", ["none", "auto"])
def test_conv_straight_into_flatten_linear(policy, bn, lowering):
    # the linear is decomposed "as a conv" on the conv's output, which the rewrite replaced first
    layers = [nn.Conv2d(4, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if bn else []) + [nn.Flatten(), nn.Linear(288, 10)]
    net = nn.Sequential(*layers).eval()
    x = torch.randn(2, 4, 6, 6)
    config = TuckerConfig(rank=1.0, only_if_cheaper=False, policy=policy, lowering=lowering)
    result = tucker_fx.compress(net, x, config=config)
    assert len(result.plan.applied) == 2, result.plan.to_markdown()
    assert rel(net(x), result.module(x)) < 1e-5


def test_factors_train_like_the_original_weights():
    # finetune trains what requires grad: the factors must not come back frozen
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(256, 4))
    x = torch.randn(1, 8, 8, 8)
    for lowering in ("none", "auto"):
        result = tucker_fx.compress(net, x, config=TuckerConfig(rank=0.5, lowering=lowering))
        assert result.plan.applied
        assert all(p.requires_grad for p in result.module.parameters())
    frozen = tucker_fx.compress(net.requires_grad_(False), x, config=TuckerConfig(rank=0.5))
    assert not any(p.requires_grad for p in frozen.module.parameters())


def test_tensorly_solver_through_compress():
    net = nn.Sequential(nn.Conv3d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, (1, 3, 3))).eval()
    x = torch.randn(2, 6, 4, 7, 7)
    exact = tucker_fx.compress(net, x, config=FULL.replace(tucker_solver="tensorly"))
    assert rel(net(x), exact.module(x)) < 1e-5
    low = [tucker_fx.compress(net, x, config=TuckerConfig(rank=0.5, tucker_solver=s, lowering="none"))
           for s in ("gram", "tensorly")]
    assert [e.ranks for e in low[0].plan] == [e.ranks for e in low[1].plan]
    assert low[1].validation.rel_error == pytest.approx(low[0].validation.rel_error, rel=0.05)


def test_weight_computed_in_forward_is_skipped_with_reason():
    class WeightNormed(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(8, 1, 1, 1))
            self.v = nn.Parameter(torch.randn(8, 4, 3, 3))
            self.c = nn.Conv2d(8, 8, 3)

        def forward(self, x):
            return self.c(F.conv2d(x, self.g * self.v))

    net = WeightNormed().eval()
    x = torch.randn(1, 4, 12, 12)
    result = tucker_fx.compress(net, x, config=TuckerConfig(rank=1.0, only_if_cheaper=False))
    skipped = [e for e in result.plan if e.kind == "none"]
    assert len(skipped) == 1 and "computed in forward" in skipped[0].reason
    assert result.plan["c"].applied and rel(net(x), result.module(x)) < 1e-5


def test_exported_program_gets_the_same_plan_as_the_module():
    # the flatten before fc1 is an aten.view in the exported graph: still "Linear as a conv"
    factory, shape = TEST_MODELS["conv2d"]
    net, x = factory().eval(), torch.randn(shape)
    config = TuckerConfig(rank=0.5, validate=False)
    ours = tucker_fx.compress(net, x, config=config)
    exported = tucker_fx.compress(torch.export.export(net, (x,)), x, config=config)
    assert [(e.name, e.kind, e.ranks) for e in exported.plan] == [(e.name, e.kind, e.ranks) for e in ours.plan]
    assert ours.plan["fc1"].as_conv


def test_channels_last_input_exact():
    conv = nn.Conv3d(6, 8, (3, 5, 5), padding=(1, 2, 2)).eval()
    x = torch.randn(2, 6, 5, 9, 9).to(memory_format=torch.channels_last_3d)
    result = tucker_fx.compress(conv, x, config=FULL)
    assert rel(conv(x), result.module(x)) < 1e-5


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_full_rank_exact_on_test_architectures(name):
    factory, shape = TEST_MODELS[name]
    model = factory()
    x = torch.randn(shape)
    result = tucker_fx.compress(model, x, config=FULL)
    with torch.no_grad():
        assert rel(model(x), result.module(x)) < 1e-5
    assert result.validation.rel_error < 1e-5
    assert all(e < 1e-5 for e in result.validation.layer_errors.values())
    # grouped convs are skipped with a reason
    for entry in result.plan:
        if not entry.applied:
            assert entry.reason


def test_exactly_low_rank_weights_are_recovered_at_their_rank():
    torch.manual_seed(1)
    conv = nn.Conv3d(16, 24, 3, padding=1).eval()
    core = torch.randn(5, 4, 3, 3, 3)
    u_t, u_s = torch.linalg.qr(torch.randn(24, 5))[0], torch.linalg.qr(torch.randn(16, 4))[0]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("abxyz,ta,sb->tsxyz", core, u_t, u_s))
    x = torch.randn(2, 16, 6, 7, 8)
    result = tucker_fx.compress(conv, x, config=TuckerConfig(ranks={"0": (4, 5)}, lowering="none"))
    assert result.plan["0"].weight_error < 1e-6
    assert rel(conv(x), result.module(x)) < 1e-5


@pytest.mark.slow  # three compressions with validation, over 5 s
def test_approximation_error_decreases_with_rank():
    model = TEST_MODELS["residual3d"][0]()
    x = torch.randn(TEST_MODELS["residual3d"][1])
    errors = [tucker_fx.compress(model, x, config=FULL.replace(rank=f)).validation.rel_error
              for f in (0.25, 0.5, 1.0)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


# --- Table 2 of the paper -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paper_result():
    return tucker_fx.compress(thetis_net(), torch.randn(THETIS_INPUT_SHAPE),
                              config=thetis_paper_config(lowering="none", merge=False))


@pytest.mark.slow  # full-size THETIS (paper_result)
def test_paper_ranks_reproduce_table2_exactly(paper_result):
    r = paper_result
    expect = {  # params after, FLOPs after: the paper's Table 2 as recomputed in docs/demo.md
        "c1": (2_446, 2_623_488_000), "c2": (526, 11_590_272), "l1": (10_160, 61_408),
        "l2": (296, 424), "l3": (170, 336),
    }
    for name, (params, flops) in expect.items():
        assert (r.plan[name].params_after, r.plan[name].flops_after) == (params, flops), name
    assert [r.plan[n].kind for n in ("c1", "c2", "l1", "l2", "l3")] == ["tucker2", "tucker2", "tucker2", "svd", "none"]
    assert r.plan["l1"].as_conv and r.plan["l1"].feature_shape == (16, 6, 9, 9)[:1] + (6, 6, 9)
    assert r.after.total_params == 13_598
    assert r.after.total_flops == 2_635_140_440
    assert round(r.params_ratio, 1) == 51.2 and round(r.flops_ratio, 2) == 5.99


@pytest.mark.slow  # full-size THETIS (paper_result)
def test_plan_costs_equal_analysis_of_rewritten_graph(paper_result):
    """The planner's formulas and the analysis of the rewritten graph agree, and so does the oracle."""
    r = paper_result
    assert sum(e.params_after for e in r.plan) == r.after.total_params
    assert sum(e.macs_after for e in r.plan) == r.after.total_macs
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            r.module(torch.randn(THETIS_INPUT_SHAPE))
    assert counter.get_total_flops() == r.after.total_flops


@pytest.mark.slow  # full-size THETIS (paper_result)
def test_rewritten_graph_is_readable_and_clean(paper_result):
    gm = paper_result.module
    gm.graph.lint()
    names = [n.name for n in gm.graph.nodes]
    assert {"c1_first", "c1_core", "c1_last", "l1_first", "l1_core", "l1_last"} <= set(names)
    assert gm.get_submodule("c1").kind == "tucker2"
    assert [n for n in names if n in ("c1", "c2", "l1", "l2")] == []
    assert sum(p.numel() for p in gm.parameters()) == 13_598


@pytest.mark.slow  # full-size THETIS
def test_vbmf_default_records_floors(paper_result):
    # random weights are noise to EVBMF: rank 0, floored to min_rank with the reason recorded
    r = tucker_fx.compress(thetis_net(), torch.randn(THETIS_INPUT_SHAPE))
    assert all(any("floored to min_rank=1" in n for n in r.plan[name].notes) for name in ("c2", "l1"))
    assert r.plan["c1"].kind == "tucker1"  # Algorithm 1: Tucker-1 on the first conv


def test_user_model_not_mutated():
    model = TEST_MODELS["residual3d"][0]().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in model.named_parameters()}
    tucker_fx.compress(model, torch.randn(TEST_MODELS["residual3d"][1]), config=TuckerConfig(rank=0.5))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {k: id(v) for k, v in model.named_parameters()} == ids
    assert isinstance(model.conv1, nn.Conv3d)


def test_compressed_module_keeps_training_flag():
    model = TEST_MODELS["residual3d"][0]().train()
    result = tucker_fx.compress(model, torch.randn(TEST_MODELS["residual3d"][1]), config=TuckerConfig(rank=0.5))
    assert result.module.training and result.module.bn1.training


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_dtype_kept(dtype):
    conv = nn.Conv2d(4, 6, 3).to(dtype).eval()
    x = torch.randn(1, 4, 8, 8, dtype=dtype)
    result = tucker_fx.compress(conv, x, config=FULL)
    assert all(p.dtype == dtype for p in result.module.parameters())
    assert rel(conv(x), result.module(x)) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_functional_site_rewritten_and_weight_removed():
    factory, shape = TEST_MODELS["functional"]
    model = factory()
    x = torch.randn(shape)
    result = tucker_fx.compress(model, x, config=FULL)
    names = dict(result.module.named_parameters())
    assert "w1" not in names and "w2" not in names and "wl" not in names
    assert any(k.startswith("conv2d_tucker.") for k in names)
    assert rel(model(x), result.module(x)) < 1e-5


def test_shared_module_decomposed_once():
    factory, shape = TEST_MODELS["shared"]
    model = factory()
    x = torch.randn(shape)
    result = tucker_fx.compress(model, x, config=FULL.replace(ranks={"shared": (8, 8), "inp": None}))
    assert [e.name for e in result.plan].count("shared") == 1
    calls = [n for n in result.module.graph.nodes if n.target == "shared.core"]
    assert len(calls) == 2
    assert rel(model(x), result.module(x)) < 1e-5


# --- the plan as data ---------------------------------------------------------------------------

@pytest.mark.slow  # full-size THETIS
def test_plan_roundtrip_and_reapply(tmp_path, paper_result):
    path = tmp_path / "plan.json"
    paper_result.plan.save(path)
    loaded = Plan.load(path)
    assert loaded.to_dict() == paper_result.plan.to_dict()
    again = tucker_fx.apply_plan(thetis_net(), loaded, torch.randn(THETIS_INPUT_SHAPE),
                                 config=TuckerConfig(lowering="none", merge=False))
    assert again.after.total_params == 13_598 and again.after.total_flops == 2_635_140_440
    assert "| c1 | conv3d | tucker2 | 2, 2 |" in loaded.to_markdown()


@pytest.mark.slow  # full-size THETIS
def test_edited_plan_is_applied(paper_result):
    plan = Plan.from_json(paper_result.plan.to_json())
    plan["c2"].ranks = (3, 4)
    plan["l2"].kind, plan["l2"].ranks = "none", None
    again = tucker_fx.apply_plan(thetis_net(), plan, torch.randn(THETIS_INPUT_SHAPE),
                                 config=TuckerConfig(lowering="none", merge=False))
    assert again.plan["c2"].ranks == (3, 4)
    assert again.plan["c2"].params_after == 6 * 3 + 4 * 3 * 75 + 4 * 16 + 16
    assert not again.plan["l2"].applied
    assert isinstance(again.module.get_submodule("l2"), nn.Linear)


def test_plan_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        Plan.load(bad)
    bad.write_text(json.dumps({"version": 99, "layers": []}))
    with pytest.raises(ValueError, match="version 99"):
        Plan.load(bad)


@pytest.mark.slow  # full-size THETIS (paper_result)
def test_plan_for_other_model_rejected(paper_result):
    with pytest.raises(ValueError, match="do not exist"):
        tucker_fx.apply_plan(TEST_MODELS["conv2d"][0](), paper_result.plan, torch.randn(TEST_MODELS["conv2d"][1]))


# --- config and bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank: expected"),
    (dict(rank=1.5), "rank: expected"),
    (dict(rank="svd"), "rank: expected"),
    (dict(ranks={"c1": (1, 2, 3)}), r"expected \(R_s, R_t\)"),
    (dict(ranks={"c1": 0}), ">= 1"),
    (dict(ranks={"c1": (0, 2)}), ">= 1"),
    (dict(policy="greedy"), "policy: expected"),
    (dict(min_rank=0), "min_rank"),
    (dict(hooi_iters=-1), "hooi_iters"),
    (dict(only_if_cheaper="yes"), "only_if_cheaper"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TuckerConfig(**kwargs)


def test_config_is_frozen():
    cfg = TuckerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'rank'"):
        cfg.rank = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.ranks["x"] = 1  # type: ignore[index]


def test_rank_above_full_in_override():
    with pytest.raises(ValueError, match=r"ranks\['c1'\] = \(5, 2\): expected 1 <= R_s <= 4"):
        tucker_fx.compress(thetis_net(), torch.randn(THETIS_INPUT_SHAPE), config=TuckerConfig(ranks={"c1": (5, 2)}))


def test_unknown_layer_in_override_lists_valid_names():
    with pytest.raises(ValueError, match=r"do not exist: \['c9'\].*'c1', 'c2', 'l1'"):
        tucker_fx.compress(thetis_net(), torch.randn(THETIS_INPUT_SHAPE), config=TuckerConfig(ranks={"c9": 2}))


def test_nan_weights_name_the_layer():
    model = thetis_net()
    with torch.no_grad():
        model.c2.weight[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(tucker_fx.DecompositionError, match="'c2'.*NaN/Inf"):
        tucker_fx.compress(model, torch.randn(THETIS_INPUT_SHAPE))


def test_int_and_fraction_ranks():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 32, 3)).eval()
    x = torch.randn(1, 8, 12, 12)
    r = tucker_fx.compress(model, x, config=TuckerConfig(rank=0.3))
    assert r.plan["0"].kind == "tucker1" and r.plan["0"].ranks == (5,)  # ceil(0.3 * 16)
    assert r.plan["1"].ranks == (5, 10)  # ceil(0.3 * 16), ceil(0.3 * 32)
    r = tucker_fx.compress(model, x, config=TuckerConfig(rank=4, only_if_cheaper=False))
    assert r.plan["1"].ranks == (4, 4)
    r = tucker_fx.compress(model, x, config=TuckerConfig(rank=100, only_if_cheaper=False))
    assert r.plan["1"].ranks == (16, 32)  # clipped to full
    r = tucker_fx.compress(model, x, config=TuckerConfig(rank=4, policy="auto"))
    assert r.plan["1"].kind in ("tucker1", "tucker2")
    cheapest = min(r.plan["1"].macs_after, r.plan["1"].macs_before)
    assert r.plan["1"].macs_after == cheapest


def test_not_cheaper_is_skipped_with_reason():
    conv = nn.Conv2d(4, 4, 1).eval()
    r = tucker_fx.compress(conv, torch.randn(1, 4, 5, 5), config=TuckerConfig(rank=1.0))
    assert not r.plan["0"].applied and "not cheaper" in r.plan["0"].reason


@pytest.mark.slow  # full-size THETIS
def test_exclude_and_filter():
    r = tucker_fx.compress(thetis_net(), torch.randn(THETIS_INPUT_SHAPE),
                           config=TuckerConfig(exclude=("l*",), layer_filter=lambda n: n != "c2"))
    assert [e.name for e in r.plan.applied] == ["c1"]
    assert "excluded by pattern 'l*'" in r.plan["l1"].reason
    assert "layer_filter" in r.plan["c2"].reason


def test_untraceable_model_in_compress():
    class Bad(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(tucker_fx.UntraceableModelError, match="backend='tucker'"):
        tucker_fx.compress(Bad(), torch.randn(2))


@pytest.mark.parametrize("bad", [None, 3, "model"])
def test_compress_type_errors(bad):
    with pytest.raises(TypeError):
        tucker_fx.compress(bad, torch.randn(1))
    with pytest.raises(TypeError, match="TuckerConfig"):
        tucker_fx.compress(nn.Linear(2, 2), torch.randn(1, 2), config={"rank": 1})


@pytest.mark.slow  # full-size THETIS, batch 4
def test_validate_reports_top1_and_sqnr(paper_result):
    x = torch.randn(4, *THETIS_INPUT_SHAPE[1:])
    original = thetis_net()
    v = tucker_fx.validate(original, paper_result.module, x)
    with torch.no_grad():
        agree = (original(x).argmax(-1) == paper_result.module(x).argmax(-1)).double().mean().item()
    assert v.top1_agreement == pytest.approx(agree)  # the fraction of the 4 rows whose argmax agrees
    assert v.sqnr_db == pytest.approx(-20 * __import__("math").log10(v.rel_error), rel=1e-6)
    assert set(v.layer_errors) == {"c1", "c2", "l1", "l2"}


def test_progress_can_be_forced_and_silenced(capsys):
    conv = nn.Conv2d(4, 8, 3).eval()
    tucker_fx.compress(conv, torch.randn(1, 4, 8, 8), config=TuckerConfig(rank=2, progress=True))
    assert "[tucker_fx 1/1" in capsys.readouterr().err
    tucker_fx.compress(conv, torch.randn(1, 4, 8, 8), config=TuckerConfig(rank=2, progress=False))
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # the full demo, over 10 s
def test_cli_demo_and_compress(tmp_path, capsys):
    from tucker_fx.cli import main

    out = tmp_path / "t2.json"
    assert main(["demo", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "13,598" in text and "2,635,140,440" in text and "x5.99" in text and "= " in text
    data = json.loads(out.read_text())
    assert data["total"]["params_after"] == 13_598 and data["total"]["ms_before"] > 0
    # the lowered column times the same decomposition, whatever the timings said
    assert data["total"]["params_lowered"] == 13_598 and data["total"]["flops_lowered"] == 2_635_140_440
    assert [r["layer"] for r in data["rows"]] == ["C1", "C2", "L1", "L2", "L3"]
    plan = tmp_path / "plan.json"
    assert main(["compress", "conv2d", "--rank", "0.5", "--plan", str(plan), "--quiet"]) == 0
    assert Plan.load(plan).applied


def test_the_result_follows_the_models_train_eval_mode() -> None:
    """New blocks are built in training mode; the compressed module must follow the user's model."""
    import warnings

    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3)).eval()
    x = torch.randn(1, 8, 12, 12)
    cfg = tucker_fx.TuckerConfig(rank=0.5, speed_check=False, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluated = tucker_fx.compress(net, x, config=cfg)
        trained = tucker_fx.compress(net.train(), x, config=cfg)
    assert not any(m.training for m in evaluated.module.modules())
    assert all(m.training for m in trained.module.modules())
