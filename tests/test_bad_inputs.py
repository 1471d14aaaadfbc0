"""The bad-input catalogue of docs/bad_inputs.md: each entry, its exception type and the key words
of its message (or, where the answer is not an error, what the result says)."""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import tucker_fx
from tucker_fx import Plan, TuckerConfig

X = torch.randn(2, 3, 8, 8)
QUIET = TuckerConfig(progress=False, tuning_cache=False)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.conv(a) + b


@pytest.fixture(scope="module")
def plan_dict():
    return tucker_fx.compress(net(), X, config=QUIET.replace(rank=0.5)).plan.to_dict()


def verb(fn: str, plan_dict: dict) -> Callable[..., Any]:
    """``fn`` as ``call(model, *inputs, config=...)``: the verbs that a catalogue row names."""
    return {
        "analyze": lambda m, *x, config=QUIET: tucker_fx.analyze(m, *x),
        "compress": lambda m, *x, config=QUIET: tucker_fx.compress(m, *x, config=config),
        "apply_plan": lambda m, *x, config=QUIET: tucker_fx.apply_plan(m, Plan.from_dict(plan_dict), *x, config=config),
        "lower": lambda m, *x, config=QUIET: tucker_fx.lower(m, *x, tune=False, tuning_cache=False),
        "validate": lambda m, *x, config=QUIET: tucker_fx.validate(m, net(), *x),
    }[fn]


ALL = ["analyze", "compress", "apply_plan", "lower", "validate"]


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a value: symbolic tracing cannot follow it
            return self.conv(x)
        return x


# --- the model --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [None, 3, "model", lambda x: x, torch.randn(3)])
@pytest.mark.parametrize("fn", ["analyze", "compress", "apply_plan", "lower", "validate"])
def test_not_a_module(fn, bad):
    call = {
        "analyze": lambda: tucker_fx.analyze(bad, X),
        "compress": lambda: tucker_fx.compress(bad, X),
        "apply_plan": lambda: tucker_fx.apply_plan(bad, Plan([]), X),
        "lower": lambda: tucker_fx.lower(bad, X),
        "validate": lambda: tucker_fx.validate(bad, net(), X),
    }[fn]
    with pytest.raises(TypeError, match=r"expects (a torch.nn.Module|two nn.Modules).*got"):
        call()


@pytest.mark.parametrize("fn", [tucker_fx.analyze, tucker_fx.compress])
def test_untraceable_model(fn):
    # each capture path's failure, the user's line, and the remedies the verb really has
    with pytest.raises(tucker_fx.UntraceableModelError,
                       match=r"(?s)could not capture Untraceable; each path failed.*symbolic_trace.*"
                             r"at \S*test_bad_inputs.py:\d+ in forward: if x.sum\(\) > 0.*"
                             r"torch.export.*Remedies:.*torch.where or torch.cond.*ExportedProgram.*backend='tucker'"):
        fn(Untraceable(), X)


@pytest.mark.parametrize("fn", ["compress", "apply_plan", "lower", "validate"])
def test_model_that_cannot_be_copied(fn, plan_dict):
    model = net()
    model.lock = threading.Lock()
    with pytest.raises(TypeError, match="could not deep-copy Sequential.*expected a model that copy.deepcopy can copy"):
        verb(fn, plan_dict)(model, X)


@pytest.mark.parametrize("fn", ["compress", "apply_plan"])
def test_weights_on_the_meta_device(fn, plan_dict):
    with pytest.raises(tucker_fx.DecompositionError, match="'0'.*meta device.*expected real weights"):
        verb(fn, plan_dict)(net().to("meta"), X.to("meta"), config=QUIET.replace(validate=False))
    assert tucker_fx.analyze(net().to("meta"), X.to("meta")).total_params == 3 * 16 * 9 + 16 + 16 * 16 * 9 + 16


@pytest.mark.parametrize("fn", ["compress", "apply_plan"])
@pytest.mark.parametrize("where", ["0", "2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights(where, value, fn, plan_dict):
    model = net()
    with torch.no_grad():
        model.get_submodule(where).weight[0, 0, 0, 0] = value
    with pytest.raises(tucker_fx.DecompositionError, match=rf"layer '{where}'.*1 NaN/Inf weight.*expected finite"):
        verb(fn, plan_dict)(model, X)
    assert tucker_fx.analyze(model, X).total_flops > 0  # counting does not read values
    excluded = tucker_fx.compress(model, X, config=QUIET.replace(exclude=(where,), validate=False))
    assert excluded.plan[where].reason == f"excluded by pattern {where!r}"  # not decomposed: not read


# --- the example inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["analyze", "compress", "apply_plan", "lower"])
def test_no_example_inputs(fn, plan_dict):
    with pytest.raises(ValueError, match=rf"{fn} needs example inputs, e.g. {fn}\(model, torch\."):
        verb(fn, plan_dict)(net())


@pytest.mark.parametrize("fn", ALL)
def test_wrong_number_of_inputs(fn, plan_dict):
    call = verb(fn, plan_dict)
    with pytest.raises(tucker_fx.ShapePropagationError, match=r"takes 1 input\(s\) \(input_1\), got 2 example input"):
        call(net(), X, X)
    with pytest.raises(tucker_fx.ShapePropagationError, match=r"takes 2 input\(s\) \(a, b\), got 1 example input"):
        call(TwoInputs(), X)


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 5, 8, 8), r"node '_0'.*input_1: \[2, 5, 8, 8\].*expected input\[2, 5, 8, 8\] to have 3 channels"),
    (torch.randn(3, 8, 8, 8, 8), r"node '_0'.*input_1: \[3, 8, 8, 8, 8\]"),
    (torch.randn(2, 3, 8, 8, dtype=torch.float64), r"node '_0'.*(type|dtype)"),
    (torch.randn(2, 3, 1, 1).expand(2, 3, 1, 1)[..., :0], r"node '_0'"),
])
@pytest.mark.parametrize("fn", ALL)
def test_inputs_that_do_not_fit(x, match, fn, plan_dict):
    with pytest.raises(tucker_fx.ShapePropagationError, match="(?s)shape propagation failed at " + match) as info:
        verb(fn, plan_dict)(net(), x)
    assert "While executing" not in str(info.value)  # one clear message, not torch's appendix


@pytest.mark.parametrize("fn", ALL)
def test_input_that_is_not_a_tensor(fn, plan_dict):
    with pytest.raises(tucker_fx.ShapePropagationError, match=r"node '_0'.*TypeError"):
        verb(fn, plan_dict)(net(), X.numpy())


def test_validate_keeps_a_failure_of_the_model_itself():
    """Inputs that fit but a model that fails on their values: torch's own error, not a shape error."""
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.cholesky(x)  # not positive definite: fails at run time only

    with pytest.raises(RuntimeError) as info:
        tucker_fx.validate(Fails(), Fails(), -torch.eye(3))
    assert not isinstance(info.value, tucker_fx.ShapePropagationError)


@pytest.mark.parametrize("fn", ["compress", "apply_plan", "validate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_to_validate_on(value, fn, plan_dict):
    x = X.clone()
    x[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=rf"{fn}: example input 0 has 1 NaN/Inf value\(s\); expected finite inputs"):
        verb(fn, plan_dict)(net(), x)
    if fn != "validate":
        assert verb(fn, plan_dict)(net(), x, config=QUIET.replace(validate=False)).validation is None


@pytest.mark.parametrize("fn", ["compress", "apply_plan", "validate"])
def test_meta_inputs_need_validate_false(fn, plan_dict):
    with pytest.raises(ValueError, match=rf"{fn}: example input 0 is a meta tensor.*validate=False"):
        verb(fn, plan_dict)(net(), X.to("meta"))
    if fn != "validate":
        result = verb(fn, plan_dict)(net(), X.to("meta"), config=QUIET.replace(validate=False, rank=0.5))
        assert result.plan.applied and result.validation is None


# --- the config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("rank", -2), ("rank", 1.5), ("rank", 0.0), ("rank", float("nan")), ("rank", True), ("rank", "svd"),
    ("ranks", [("0", 2)]), ("ranks", {"0": (1, 2, 3)}), ("ranks", {"0": 0}), ("ranks", {"0": 2.5}),
    ("ranks", {"0": (0, 1)}), ("policy", "greedy"), ("min_rank", 0), ("min_rank", True), ("exclude", (3,)),
    ("layer_filter", "0"), ("hooi_iters", -1), ("hooi_iters", True), ("lowering", "fft"), ("tuning_repeats", 0),
    ("tuning_cache", 3), ("lowering_tolerance", 0), ("lowering_tolerance", float("nan")),
    ("lowering_tolerance", True), ("validate", "yes"), ("merge", 1), ("progress", "loud"),
    ("keep_original_if_faster", "yes"), ("keep_original_if_faster", 1), ("keep_original_if_faster", None),
])
def test_invalid_config_values(field, value):
    with pytest.raises(ValueError, match=rf"TuckerConfig\.{field}.*expected"):
        TuckerConfig(**{field: value})


def test_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="config must be a TuckerConfig, got dict"):
        tucker_fx.compress(net(), X, config={"rank": 2})
    with pytest.raises(TypeError, match="config must be a TuckerConfig, got dict"):
        tucker_fx.apply_plan(net(), Plan([]), X, config={"rank": 2})
    with pytest.raises(TypeError, match="unexpected keyword argument 'ranks_'"):
        TuckerConfig(ranks_={"0": 2})


def test_unknown_layer_names_in_overrides():
    with pytest.raises(ValueError, match=r"TuckerConfig.ranks names layers that do not exist: \['conv9'\]; "
                                         r"the layers are: \['0', '2'\]"):
        tucker_fx.compress(net(), X, config=QUIET.replace(ranks={"conv9": 2}))


def test_override_above_full_rank():
    with pytest.raises(ValueError, match=r"ranks\['2'\] = \(17, 2\): expected 1 <= R_s <= 16 and 1 <= R_t <= 16"):
        tucker_fx.compress(net(), X, config=QUIET.replace(ranks={"2": (17, 2)}))


def test_override_on_a_layer_that_cannot_be_decomposed():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.ConvTranspose2d(6, 4, 3)).eval()
    for name in ("0", "1"):
        with pytest.raises(ValueError, match=rf"ranks\['{name}'\] = 2: this layer cannot be decomposed "
                                             r"\((groups=3|transposed).*expected no override or None"):
            tucker_fx.compress(model, X, config=QUIET.replace(ranks={name: 2}))


def test_exclude_pattern_that_matches_nothing_is_noted():
    result = tucker_fx.compress(net(), X, config=QUIET.replace(exclude=("conv*",), rank=0.5))
    assert "exclude pattern 'conv*' matches no layer; the layers are: ['0', '2']" in result.plan.notes
    assert "Note: exclude pattern 'conv*'" in result.plan.to_markdown()


# --- models with nothing to do --------------------------------------------------------------------------

@pytest.mark.parametrize("model,x", [
    (nn.Sequential(), X),
    (nn.Identity(), X),
    (nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), X),
    (nn.LSTM(8, 4, batch_first=True), torch.randn(2, 5, 8)),
])
def test_models_without_conv_or_linear(model, x):
    result = tucker_fx.compress(model, x, config=QUIET)
    assert len(result.plan) == 0 and "no conv or linear layer" in result.plan.notes[0]
    assert "nothing to decompose" in result.plan.to_markdown()
    assert result.after.total_params == result.before.total_params
    assert result.validation is not None and result.validation.rel_error == 0.0
    report = tucker_fx.analyze(model, x)
    assert report.total_flops == 0
    if isinstance(model, nn.LSTM):  # an op without a cost formula is listed, never counted as 0 silently
        assert report.unsupported and "LSTM" in report.unsupported[0]


def test_model_with_no_eligible_layer_is_returned_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.BatchNorm2d(6), nn.ConvTranspose2d(6, 4, 3),
                          nn.Conv2d(4, 4, 1)).eval()
    result = tucker_fx.compress(model, X, config=QUIET.replace(rank=1.0))
    reasons = {e.name: e.reason for e in result.plan}
    assert "groups=3" in reasons["0"] and "transposed" in reasons["2"] and "not cheaper" in reasons["3"]
    assert not result.plan.applied and "no layer is to be decomposed" in result.plan.notes[-1]
    # no pass ran: not even BatchNorm folding; the graph is the traced model
    assert set(result.module.state_dict()) == set(model.state_dict())
    assert all(torch.equal(result.module.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(result.module(X), model(X))


# --- plan files and plans -------------------------------------------------------------------------------

def _entry_edit(data, **changes):
    data = json.loads(json.dumps(data))
    data["layers"][1].update(changes)
    return data


@pytest.mark.parametrize("edit,match", [
    (lambda d: "{not json", "invalid JSON"),
    (lambda d: [], "expected a plan dict with 'version' and 'layers'"),
    (lambda d: {**d, "version": 2}, "plan version 2 is not supported; expected 1"),
    (lambda d: {**d, "layers": {"0": 1}}, "'layers' must be a list of entries, got dict"),
    (lambda d: {**d, "layers": [1]}, "a plan entry must be a JSON object, got int"),
    (lambda d: _entry_edit(d, colour="red"), r"unknown plan entry fields \['colour'\]"),
    (lambda d: {**d, "layers": [{k: v for k, v in d["layers"][0].items() if k != "kind"}]},
     r"plan entry '0' lacks the field\(s\) \['kind'\]"),
    (lambda d: _entry_edit(d, ranks=["8", 4]), r"plan entry '2': ranks must be a list of ints, got \['8', 4\]"),
])
def test_bad_plan_files(tmp_path, plan_dict, edit, match):
    path = tmp_path / "plan.json"
    data = edit(plan_dict)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError, match=match):
        Plan.load(path)


def test_plan_file_that_is_not_text_or_missing(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not a plan: not UTF-8 text"):
        Plan.load(path)
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "absent.json")


@pytest.mark.parametrize("edit,error,match", [
    (lambda d: _entry_edit(d, kind="cp"), ValueError, r"plan entry '2': kind 'cp', expected one of"),
    (lambda d: _entry_edit(d, ranks=[8, 4, 2]), ValueError, r"tucker2 needs ranks \(R_s, R_t\), got \(8, 4, 2\)"),
    (lambda d: _entry_edit(d, ranks=[99, 4]), ValueError, r"plan does not fit this model.*expected 1 <= R_s <= 16"),
    (lambda d: _entry_edit(d, name="conv9"), ValueError, r"plan does not fit this model.*do not exist: \['conv9'\]"),
])
def test_plans_that_do_not_fit(plan_dict, edit, error, match):
    with pytest.raises(error, match=match):
        tucker_fx.apply_plan(net(), Plan.from_dict(edit(plan_dict)), X, config=QUIET)


def test_plan_of_another_model_with_the_same_layer_names(plan_dict):
    plan = Plan.from_dict(plan_dict)
    linear = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(ValueError, match=r"plan's layer '0' is a conv2d, this model's is a linear \(8 -> 16\): "
                                         r"the plan was made for another model"):
        tucker_fx.apply_plan(linear, plan, torch.randn(2, 8), config=QUIET)
    narrower = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    with pytest.raises(ValueError, match=r"plan's layer '2' has 2,320 parameters, this model's has 1,160 "
                                         r"\(conv2d 16 -> 8, weight \(8, 16, 3, 3\)\)"):
        tucker_fx.apply_plan(narrower, plan, X, config=QUIET)


def test_apply_plan_needs_a_plan(plan_dict):
    with pytest.raises(TypeError, match="apply_plan expects a tucker_fx.Plan, got dict"):
        tucker_fx.apply_plan(net(), plan_dict, X)


# --- saved files (the full matrix is in test_io.py) -------------------------------------------------------

def test_bad_saved_files(tmp_path):
    result = tucker_fx.compress(net(), X, config=QUIET.replace(rank=0.5))
    path = tucker_fx.save(result, tmp_path / "net")
    with pytest.raises(ValueError, match=r"not the architecture that was compressed.*'2.weight' has shape"):
        tucker_fx.load(path, nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)), X)
    weights = path / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"weights.pt: cannot read the weights \(truncated, damaged"):
        tucker_fx.load(path, net(), X)
    with pytest.raises(ValueError, match="no saved tucker_fx model at"):
        tucker_fx.load(tmp_path / "nowhere", net(), X)
