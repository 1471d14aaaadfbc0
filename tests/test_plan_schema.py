"""One schema check for plan data: Plan.from_dict / Plan.load and tucker_fx.load (a save's
manifest) refuse the same plans with the same message (tucker_fx.planning.plan.check_plan_data)."""

import json

import pytest
import torch
from torch import nn

import tucker_fx
from tucker_fx.planning.plan import Plan, check_plan_data
from tucker_fx.planning.schema import SchemaError

# a rank-2 Linear of random weights is a poor approximation; that is not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::tucker_fx.errors.PoorCompressionWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    result = tucker_fx.compress(nn.Linear(16, 16), x, config=tucker_fx.TuckerConfig(rank=2, progress=False,
                                                                                     tuning_cache=False))
    return x, result, tucker_fx.save(result, tmp_path_factory.mktemp("schema") / "lin")


BAD_PLANS = {
    "lowering a number": (lambda p: p["layers"][0].update(lowering=3),
                          r"plan.layers\[0\] \('.*'\).lowering: expected Optional\[str\], got int 3"),
    "timings of strings": (lambda p: p["layers"][0].update(timings_ms={"fft": "fast"}),
                           r"plan.layers\[0\] \('.*'\).timings_ms: expected dict\[str, float\], got dict"),
    "functional a string": (lambda p: p["layers"][0].update(functional="no"),
                            r"plan.layers\[0\] \('.*'\).functional: expected bool, got str 'no'"),
    "ranks of strings": (lambda p: p["layers"][0].update(ranks=["2"]),
                         r"plan entry '.*': ranks must be a list of ints, got \['2'\]"),
    "kind missing": (lambda p: p["layers"][0].pop("kind"), r"plan entry '.*' lacks the field\(s\) \['kind'\]"),
    "unknown field": (lambda p: p["layers"][0].update(colour="red"), r"unknown plan entry fields \['colour'\]"),
    "other version": (lambda p: p.update(version=7), "plan version 7 is not supported; expected 1"),
    "capture unknown": (lambda p: p.update(capture="jit"), r"the plan's 'capture' must be one of .* got 'jit'"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_plan_files_and_saves_refuse_the_same_plans_alike(saved, tmp_path, case):
    x, result, path = saved
    damage, match = BAD_PLANS[case]
    data = result.plan.to_dict()
    damage(data)
    with pytest.raises(SchemaError, match=match):
        check_plan_data(data)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        Plan.load(plan_file)

    manifest_file = path / "tucker_fx.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["plan"] = data
    target = tmp_path / "save"
    target.mkdir()
    for f in path.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    (target / "tucker_fx.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"tucker_fx.json: the entry 'plan': " + match):
        tucker_fx.load(target, nn.Linear(16, 16), x)


def test_a_good_plan_passes_and_round_trips(saved):
    _, result, _ = saved
    data = result.plan.to_dict()
    check_plan_data(data)
    assert Plan.from_dict(data).to_dict() == data
