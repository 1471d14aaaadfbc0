"""tucker_fx.save / tucker_fx.load: exact round trips, no code unpickled, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import tucker_fx
from tucker_fx import TuckerConfig
from tucker_fx.io import FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME
from tucker_fx.models import TEST_MODELS


def _fresh(name: str) -> nn.Module:
    """A new instance of a test architecture, with other weights than the compressed one."""
    model = TEST_MODELS[name][0]()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _compressed(name: str, **config):
    torch.manual_seed(0)
    model = TEST_MODELS[name][0]().eval()
    x = torch.randn(TEST_MODELS[name][1])
    cfg = TuckerConfig(rank=0.5, progress=False, tuning_cache=False, **config)
    return model, x, tucker_fx.compress(model, x, config=cfg)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The residual 3D net (BatchNorm folded, lowered, merged), saved once."""
    model, x, result = _compressed("residual3d")
    path = tucker_fx.save(result, tmp_path_factory.mktemp("io") / "residual3d")
    return model, x, result, path


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# --- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,config", [
    ("residual3d", {}),                                   # BN folding, cost-model lowering, merges
    ("conv2d", {"lowering": "none", "merge": False}),     # the plain chain; as-conv linear after flatten
    ("functional", {}),                                   # F.conv on get_attr weights
    ("shared", {"ranks": {"shared": (8, 8), "inp": None}}),  # one block for two calls
    ("conv1d", {"fold_bn": False}),
])
def test_round_trip_is_exact(tmp_path, name, config):
    _, x, result = _compressed(name, **config)
    path = tucker_fx.save(result, tmp_path / name)
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]
    fresh = _fresh(name)
    loaded = tucker_fx.load(path, fresh, x)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), result.module(x))
        x2 = torch.randn_like(x)
        assert torch.equal(loaded.module(x2), result.module(x2))
    assert loaded.plan.to_dict() == result.plan.to_dict()
    assert loaded.module.meta["tucker_fx.plan"] is loaded.plan
    assert loaded.validation is None
    assert loaded.after.total_params == result.after.total_params
    assert loaded.after.total_flops == result.after.total_flops
    assert str(loaded.module.graph) == str(result.module.graph)


@pytest.mark.slow  # full-size THETIS
def test_round_trip_of_the_paper_net_with_fft_lowering(tmp_path):
    from tucker_fx.models import THETIS_INPUT_SHAPE, thetis_net, thetis_paper_config

    x = torch.randn(THETIS_INPUT_SHAPE)
    result = tucker_fx.compress(thetis_net(), x, config=thetis_paper_config(validate=False, tuning_cache=False))
    assert {e.lowering for e in result.plan.applied} >= {"fft"}
    path = tucker_fx.save(result, tmp_path / "thetis")
    loaded = tucker_fx.load(path, thetis_net(), x)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), result.module(x))
    assert loaded.after.total_params == 13_598


def test_load_keeps_flags_and_never_touches_the_model(saved):
    model, x, result, path = saved
    fresh = _fresh("residual3d").train()  # a new instance is in training mode; it was saved in eval mode
    fresh.conv1.weight.requires_grad_(False)
    before, ids = _state(fresh), {k: id(p) for k, p in fresh.named_parameters()}
    loaded = tucker_fx.load(path, fresh, x)
    assert _unchanged(fresh, before) and {k: id(p) for k, p in fresh.named_parameters()} == ids
    assert fresh.training and all(m.training for m in fresh.modules())
    assert not fresh.conv1.weight.requires_grad
    assert [m.training for m in loaded.module.modules()] == [m.training for m in result.module.modules()]
    assert {k: p.requires_grad for k, p in loaded.module.named_parameters()} == \
        {k: p.requires_grad for k, p in result.module.named_parameters()}


def test_frozen_parameters_stay_frozen(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 4, 10, 10)
    result = tucker_fx.compress(model, x, config=TuckerConfig(rank=0.5, lowering="none"))
    loaded = tucker_fx.load(tucker_fx.save(result, tmp_path / "m"), nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), x)
    assert not any(p.requires_grad for p in loaded.module.parameters())


def test_files_hold_json_and_tensors_only(saved):
    _, _, result, path = saved
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["plan"]["version"] == 1
    assert manifest["config"] == {"fold_bn": True, "lowering": "auto", "merge": True}
    assert manifest["source"]["class"] == "Residual3dNet"
    state = torch.load(path / WEIGHTS_NAME, weights_only=True)
    assert set(state) == set(result.module.state_dict()) == set(manifest["weights"]["tensors"])
    assert all(type(v) is torch.Tensor for v in state.values())


def test_saving_again_replaces_the_files(saved, tmp_path):
    _, x, result, _ = saved
    path = tucker_fx.save(result, tmp_path / "again")
    tucker_fx.save(result, path)
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]  # no temporary files left
    assert torch.equal(tucker_fx.load(path, _fresh("residual3d"), x).module(x), result.module(x))


# --- refusals -----------------------------------------------------------------------------------------

def _copy(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for f in path.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _edit_manifest(path: Path, edit) -> None:
    data = json.loads((path / MANIFEST_NAME).read_text())
    edit(data)
    (path / MANIFEST_NAME).write_text(json.dumps(data))


def _edit_weights(path: Path, edit) -> None:
    state = torch.load(path / WEIGHTS_NAME, weights_only=True)
    edit(state)
    torch.save(state, path / WEIGHTS_NAME)


def _first_weight(path: Path) -> str:
    return next(k for k in json.loads((path / MANIFEST_NAME).read_text())["weights"]["tensors"] if k.endswith("weight"))


def _cases():
    return {
        "missing directory": (lambda p: __import__("shutil").rmtree(p), "no saved tucker_fx model"),
        "missing manifest": (lambda p: (p / MANIFEST_NAME).unlink(), "no saved tucker_fx model"),
        "missing weights": (lambda p: (p / WEIGHTS_NAME).unlink(), "weights file is missing"),
        "truncated manifest": (lambda p: (p / MANIFEST_NAME).write_text((p / MANIFEST_NAME).read_text()[:200]),
                               "not valid JSON"),
        "truncated weights": (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:1000]),
                              "cannot read the weights"),
        "not a save file": (lambda p: (p / MANIFEST_NAME).write_text('{"layers": []}'), "not a tucker_fx save file"),
        "other format version": (lambda p: _edit_manifest(p, lambda d: d.update(format_version=99)),
                                 r"format version 99 is not supported; expected one of \[1, 2\]"),
        "other plan version": (lambda p: _edit_manifest(p, lambda d: d["plan"].update(version=7)),
                               "plan version 7 is not supported"),
        "tensor missing": (lambda p: _edit_weights(p, lambda s: s.pop(_first_weight(p))),
                           "weights.pt lacks 1 tensor"),
        "tensor extra": (lambda p: _edit_weights(p, lambda s: s.update(stowaway=torch.zeros(3))),
                         "weights.pt has 1 tensor.*'stowaway'"),
        "tensor mis-shaped": (lambda p: _edit_weights(p, lambda s: s.update({_first_weight(p): torch.zeros(2, 2)})),
                              r"has shape \(2, 2\) in weights.pt"),
        "tensor changed": (lambda p: _edit_weights(p, lambda s: s[_first_weight(p)].mul_(2)), "SHA-256 differs"),
        "pickled code": (lambda p: torch.save({"w": Path("x")}, p / WEIGHTS_NAME), "cannot read the weights"),
        "structure differs": (lambda p: _edit_manifest(p, lambda d: d["config"].update(fold_bn=False)),
                              r"re-applying the plan did not rebuild the saved structure \(.*'bn1.weight'.*\)"
                              r"\. Possible causes: .*tucker_fx.json was edited"),
        **{f"manifest: {k}": (lambda p, edit=edit: _edit_manifest(p, edit), match)
           for k, (edit, match) in _manifest_damage().items()},
    }


def _manifest_damage():
    """Hand edits of tucker_fx.json: each is a ValueError naming the field, never a bare TypeError/KeyError."""
    def first(d: dict) -> str:
        return next(iter(d["weights"]["tensors"]))

    return {
        "not an object": (lambda d: (d.clear(), d.update(format="tucker_fx.compressed", format_version=2)),
                          r"the manifest: lacks the field\(s\) \['config', 'source', 'plan', 'weights', 'structure'\]"),
        "format_version a string": (lambda d: d.update(format_version="2"), "format version '2' is not supported"),
        "source missing": (lambda d: d.pop("source"), r"the manifest: lacks the field\(s\) \['source'\]"),
        "config.merge a string": (lambda d: d["config"].update(merge="yes"),
                                  "config.merge: expected true or false, got str"),
        "config.lowering missing": (lambda d: d["config"].pop("lowering"),
                                    r"config: lacks the field\(s\) \['lowering'\]"),
        "tensor entry not an object": (lambda d: d["weights"]["tensors"].update({first(d): 1}),
                                       r"weights.tensors\['.*'\]: expected an object, got int"),
        "tensor entry without shape": (lambda d: d["weights"]["tensors"][first(d)].pop("shape"),
                                       r"weights.tensors\['.*'\]: lacks the field\(s\) \['shape'\]"),
        "shape of strings": (lambda d: d["weights"]["tensors"][first(d)].update(shape=["2"]),
                             r"weights.tensors\['.*'\].shape: expected a list of sizes"),
        "requires_grad a number": (lambda d: d["weights"]["tensors"][first(d)].update(requires_grad=1),
                                   r"requires_grad: expected true or false, got int"),
        "weights.file with ..": (lambda d: d["weights"].update(file="../weights.pt"),
                                 r"weights.file: expected a file name in the save directory.*'\.\./weights.pt'"),
        "weights.file absolute": (lambda d: d["weights"].update(file="/etc/passwd"),
                                  "weights.file: expected a file name"),
        "weights.sha256 a number": (lambda d: d["weights"].update(sha256=5), "weights.sha256: expected 64 hexadecimal"),
        "source.training a list": (lambda d: d["source"].update(training=[1]),
                                   "source.training: expected an object, got list"),
        "source.training flag a string": (lambda d: d["source"]["training"].update({"": "no"}),
                                          r"source.training\[''\]: expected true or false"),
        "source.inputs entry a number": (lambda d: d["source"].update(inputs=[1]),
                                         r"source.inputs\[0\]: expected an object, got int"),
        "source.tensors a list": (lambda d: d["source"].update(tensors=[1]), "source.tensors: expected an object"),
        "structure missing": (lambda d: d.pop("structure"), r"lacks the field\(s\) \['structure'\]"),
        "structure.nodes not strings": (lambda d: d["structure"].update(nodes=[1]), "structure.nodes: expected a list"),
        "plan not an object": (lambda d: d.update(plan=[]), "plan: expected an object, got list"),
        "plan entry name a list": (lambda d: d["plan"]["layers"][0].update(name=["x"]),
                                   r"plan.layers\[0\] \(\['x'\]\).name: expected str, got list"),
        "plan entry lowering a number": (lambda d: d["plan"]["layers"][0].update(lowering=3),
                                         r"plan.layers\[0\] \('stem'\).lowering: expected Optional\[str\], got int"),
        "plan entry without kind": (lambda d: d["plan"]["layers"][0].pop("kind"),
                                    r"the entry 'plan': plan entry 'stem' lacks the field\(s\) \['kind'\]"),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_bad_files_are_refused_and_nothing_is_loaded(saved, tmp_path, case):
    _, x, _, path = saved
    damage, match = _cases()[case]
    target = _copy(path, tmp_path)
    damage(target)
    fresh = _fresh("residual3d")
    before = _state(fresh)
    with pytest.raises(ValueError, match=match):
        tucker_fx.load(target, fresh, x)
    assert _unchanged(fresh, before)


def test_other_architecture_is_named(saved):
    _, x, _, path = saved
    with pytest.raises(ValueError, match=r"Conv2dNet\) is not the architecture that was compressed \(Residual3dNet\)"
                                         r".*lacks \d+ tensor"):
        tucker_fx.load(path, _fresh("conv2d"), x)
    wider = _fresh("residual3d")
    wider.fc = nn.Linear(wider.fc.in_features, 11)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(11, \d+\) in this model, \(10, \d+\) in the saved"):
        tucker_fx.load(path, wider, x)
    with pytest.raises(ValueError, match="dtype float64 in this model, float32 in the saved model"):
        tucker_fx.load(path, _fresh("residual3d").double(), x.double())


def _small(activation: type = nn.ReLU, padding: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), activation(), nn.Conv2d(8, 8, 3, padding=padding)).eval()


@pytest.fixture(scope="module")
def small_saved(tmp_path_factory):
    x = torch.randn(1, 4, 10, 10)
    result = tucker_fx.compress(_small(), x, config=TuckerConfig(rank=0.5, progress=False, tuning_cache=False))
    return x, result, tucker_fx.save(result, tmp_path_factory.mktemp("io") / "small")


@pytest.mark.parametrize("other,match", [
    (lambda: _small(activation=nn.Tanh), r"node 3 is `call_module 1 Tanh\(\)\(%2\)` here, "
                                         r"`call_module 1 ReLU\(\)\(%2\)` in the saved model"),
    (lambda: _small(padding=1), r"node 5 is `call_module 2.core Conv2d\(.*padding=\(1, 1\).*` here, "
                                r"`call_module 2.core Conv2d\(.*padding=\(0, 0\).*` in the saved model"),
])
def test_same_tensors_in_another_graph_is_another_architecture(small_saved, other, match):
    """Same tensor names and shapes, another activation or geometry: the rebuilt graph tells."""
    x, _, path = small_saved
    model = other()
    before = _state(model)
    with pytest.raises(ValueError, match=r"did not rebuild the saved structure \(" + match +
                       r".*this model \(Sequential\) is not the architecture that was compressed"):
        tucker_fx.load(path, model, x)
    assert _unchanged(model, before)


def test_format_1_files_still_load(small_saved, tmp_path):
    """Files written before the graph's structure was recorded load without that check."""
    x, result, path = small_saved
    target = _copy(path, tmp_path)
    _edit_manifest(target, lambda d: (d.update(format_version=1), d.pop("structure")))
    with torch.no_grad():
        assert torch.equal(tucker_fx.load(target, _small(), x).module(x), result.module(x))


@pytest.mark.parametrize("fresh", ["nan", "inf", "meta", "uninitialised"])
def test_the_fresh_model_weights_are_never_read(small_saved, fresh):
    """The plan is re-applied without reading the fresh model's values: NaN, meta or torch.empty are fine."""
    x, result, path = small_saved
    if fresh == "meta":
        with torch.device("meta"):
            model = _small()
    else:
        model = _small()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(fresh)) if fresh in ("nan", "inf") else p.set_(torch.empty_like(p))
    before = {k: (v.shape, v.device) for k, v in model.state_dict().items()}
    loaded = tucker_fx.load(path, model, x)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), result.module(x))
    assert {k: (v.shape, v.device) for k, v in model.state_dict().items()} == before  # the meta model stays meta
    assert all(p.device.type == "cpu" for p in loaded.module.parameters())


def test_meta_buffers_that_are_not_saved_are_refused(small_saved):
    x, _, path = small_saved
    with torch.device("meta"):
        model = _small()
    model.register_buffer("table", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(ValueError, match="buffer 'table' is on the meta device and is not saved"):
        tucker_fx.load(path, model, x)


def test_wrong_number_of_inputs(saved):
    _, x, _, path = saved
    with pytest.raises(ValueError, match=r"saved with 1 example input\(s\) \[\(2, 3, 8, 16, 16\)\], got 2"):
        tucker_fx.load(path, _fresh("residual3d"), x, x)


def test_save_refuses_bad_arguments(saved, tmp_path):
    _, _, result, _ = saved
    with pytest.raises(TypeError, match="CompressionResult, got Residual3dNet"):
        tucker_fx.save(result.module, tmp_path / "m")
    with pytest.raises(TypeError, match="nn.Module, got str"):
        tucker_fx.load(tmp_path, "Residual3dNet")
    bare = tucker_fx.CompressionResult(result.module, result.plan, result.before, result.after, None)
    with pytest.raises(ValueError, match="does not record the model it came from"):
        tucker_fx.save(bare, tmp_path / "m")
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match="expected a directory path, got the existing file"):
        tucker_fx.save(result, file)
