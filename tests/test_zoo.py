"""Real networks nobody here wrote (MONAI) and the in-house video models, through the whole pipeline.

The zoo is :mod:`tucker_fx.testing.zoo`: small seeded configurations, each forward well under 0.3 s.
What cannot be captured or compiled today is an ``xfail`` with the reason observed (strict: a fix
turns it into a failure until the mark is removed), so this file stays an honest table.
Reference outputs are always the user's model run eagerly here, never the library's own validation.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._dynamo

pytest.importorskip("monai")
pytest.importorskip("einops")

import tucker_fx  # noqa: E402
from tucker_fx.testing.zoo import ZOO, build, flat_outputs, names, rel_error  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

FULL = {"rank": 1.0, "only_if_cheaper": False, "progress": False}
BACKEND_FULL = {**FULL, "inner": "eager"}
HALF = {"rank": 0.5, "only_if_cheaper": True, "progress": False}  # the default config at rank 0.5
TOL = 1e-4

# every model but the heavy ones (fixed widths, millions of parameters); the transformers (81 and 53
# layers to decompose, SwinUNETR's 32^3 input) are slow
SLOW_MODELS = {"monai_swin_unetr", "monai_unetr"}
MODELS = [n for n in names() if "heavy" not in ZOO[n].tags]

# (step, model) -> the reason observed, 2026-12-05; steps: "backend", "compress", "backend_half"
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _cases(step: str, models: list[str]) -> list:
    out = []
    for name in models:
        marks = []
        if name in SLOW_MODELS:
            marks.append(pytest.mark.slow)
        if (step, name) in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[(step, name)], strict=True))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _snapshot(model: torch.nn.Module) -> dict:
    """What must not change in the user's model: values and identity of its state, flags, hooks."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "params": [id(p) for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "classes": [type(m) for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks)) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def _assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["ids"] == before["ids"], "the model's parameters/buffers were replaced"
    assert after["params"] == before["params"]
    assert after["classes"] == before["classes"], "the model's modules were swapped"
    assert after["training"] == before["training"], "training flags changed"
    assert after["hooks"] == before["hooks"], "hooks were added to the model"
    assert after["requires_grad"] == before["requires_grad"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"


def _eager(model: torch.nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def _compile(model: torch.nn.Module, **options):
    return torch.compile(model, backend="tucker", options={**BACKEND_FULL, **options})


# --- the zoo itself ------------------------------------------------------------------------------

def test_importing_the_zoo_does_not_import_monai():
    code = "import sys, tucker_fx.testing.zoo as z; assert z.ZOO; print('monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", MODELS)
def test_zoo_entry_is_seeded_and_in_eval_mode(name):
    model, x = build(name)
    again, x2 = build(name)
    other, _ = build(name, seed=1)
    assert not any(m.training for m in model.modules())
    assert torch.equal(x, x2) and tuple(x.shape) == ZOO[name].input_shape
    y = flat_outputs(_eager(model, x))
    assert y and all(torch.isfinite(t).all() for t in y)
    assert rel_error(_eager(model, x), _eager(again, x)) == 0.0
    assert rel_error(_eager(model, x), _eager(other, x)) > 1e-3, "seed 1 should give another checkpoint"


def test_build_keeps_the_callers_random_state_and_rejects_unknown_names():
    state = torch.random.get_rng_state()
    build("swin3d_seg")
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="unknown zoo model 'nope'"):
        build("nope")


# --- (a) the backend at full rank equals eager, (f) the model is untouched -----------------------

@pytest.mark.parametrize("name", _cases("backend", MODELS))
def test_backend_full_rank_equals_eager(name):
    model, x = build(name)
    before = _snapshot(model)
    reference = _eager(model, x)
    reports = []
    with torch.no_grad():
        out = _compile(model, on_report=reports.append)(x)
    assert rel_error(reference, out) < TOL
    assert sum(len(r.plan.applied) for r in reports) > 0, "no layer was decomposed"
    _assert_untouched(model, before)


@pytest.mark.parametrize("name", _cases("backend", ["monai_unet_bn", "monai_segresnet", "video_unet"]))
def test_backend_full_rank_aot_eager(name):
    model, x = build(name)
    reference = _eager(model, x)
    with torch.no_grad():
        out = _compile(model, inner="aot_eager")(x)
    assert rel_error(reference, out) < TOL


@pytest.mark.slow
def test_backend_full_rank_inductor():
    model, x = build("monai_unet_bn")
    reference = _eager(model, x)
    with torch.no_grad():
        out = _compile(model, inner="inductor")(x)
    assert rel_error(reference, out) < TOL


# --- (b) compress at full rank equals the model itself, (f) the model is untouched ---------------

@pytest.mark.parametrize("name", _cases("compress", MODELS))
def test_compress_full_rank_equals_the_model(name):
    model, x = build(name)
    before = _snapshot(model)
    reference = _eager(model, x)
    result = tucker_fx.compress(model, x, config=tucker_fx.TuckerConfig(**FULL))
    assert result.plan.applied, "no layer was decomposed"
    with torch.no_grad():
        out = result.module(x)
    assert rel_error(reference, out) < TOL
    _assert_untouched(model, before)


# --- (c) rank 0.5 and (d) two checkpoints of one class in one process -----------------------------

# BasicUNet breaks the graph 8 times (torch.jit.isinstance): Dynamo shares its up-block graphs between instances
TWO_FULL = ["monai_basic_unet", "monai_segresnet", "video_unet"]
TWO_HALF = ["monai_unet_bn", "monai_segresnet", "monai_dynunet", "video_unet"]
HALF_ONLY = ["monai_unet_in", "monai_attention_unet", "monai_densenet", "monai_resnet10", "monai_var_autoencoder",
             "monai_segresnet_vae", "monai_highresnet", "swin3d_seg"]


@pytest.mark.parametrize("name", _cases("backend", TWO_FULL))
def test_two_checkpoints_full_rank_each_give_their_own_answer(name):
    (m0, x), (m1, _) = build(name, seed=0), build(name, seed=1)
    y0, y1 = _eager(m0, x), _eager(m1, x)
    assert rel_error(y0, y1) > 1e-2
    c0, c1 = _compile(m0), _compile(m1)  # no reset in between: one process, one Dynamo cache
    with torch.no_grad():
        out0, out1 = c0(x), c1(x)
        again0 = c0(x)
    assert rel_error(y0, out0) < TOL
    assert rel_error(y1, out1) < TOL
    assert rel_error(y0, again0) < TOL


@pytest.mark.parametrize("name", _cases("backend_half", TWO_HALF))
def test_rank_half_backend_equals_compress_of_each_instance(name):
    (m0, x), (m1, _) = build(name, seed=0), build(name, seed=1)
    expected = []
    for m in (m0, m1):
        result = tucker_fx.compress(m, x, config=tucker_fx.TuckerConfig(**HALF))
        assert result.after.total_params < result.before.total_params
        with torch.no_grad():
            y = result.module(x)
        assert all(torch.isfinite(t).all() for t in flat_outputs(y))
        expected.append(y)
    c0, c1 = _compile(m0, **HALF), _compile(m1, **HALF)
    with torch.no_grad():
        out0, out1 = c0(x), c1(x)
    assert rel_error(expected[0], out0) < TOL
    assert rel_error(expected[1], out1) < TOL


@pytest.mark.parametrize("name", _cases("compress", HALF_ONLY))
def test_rank_half_compress_is_smaller_and_finite(name):
    model, x = build(name)
    result = tucker_fx.compress(model, x, config=tucker_fx.TuckerConfig(**HALF, validate=False))
    assert result.plan.applied
    assert result.after.total_params < result.before.total_params
    with torch.no_grad():
        y = result.module(x)
    assert all(torch.isfinite(t).all() for t in flat_outputs(y))


# --- (e) the batch size changes between calls -----------------------------------------------------

@pytest.mark.parametrize("name", _cases("backend", ["monai_unet_in", "monai_segresnet", "video_unet"]))
def test_backend_batch_one_then_two(name):
    model, x1 = build(name)
    x2 = ZOO[name].example_input(batch=2, seed=1)
    compiled = _compile(model)
    with torch.no_grad():
        out1, out2 = compiled(x1), compiled(x2)
    assert rel_error(_eager(model, x1), out1) < TOL
    assert rel_error(_eager(model, x2), out2) < TOL


# --- (f) the buffer passes on real graphs: the same numbers as the plain decomposition ----------------

BUFFER_MODELS = ["monai_unet_in", "monai_basic_unet", "monai_segresnet", "monai_dynunet", "monai_resnet10",
                 "monai_autoencoder", "monai_highresnet", "video_unet"]


@pytest.mark.parametrize("name", _cases("compress", BUFFER_MODELS))
def test_buffer_passes_on_real_graphs_match_the_plain_decomposition(name, monkeypatch):
    """Norms folded into 1x1 convs, maps in reused buffers (every size, here), separable pools: the
    compressed model gives what ``lowering="none"`` gives, call after call, in inference mode too,
    and the example input is never written."""
    import tucker_fx.passes.workspace as workspace_pass
    from tucker_fx._internal.meta import NOTES_KEY

    monkeypatch.setattr(workspace_pass, "MIN_BYTES", 0)  # the zoo's inputs are small
    model, x = build(name)
    kept = x.clone()
    config = tucker_fx.TuckerConfig(rank=0.25, progress=False, validate=False)
    lowered = tucker_fx.compress(model, x, config=config)
    plain = tucker_fx.compress(model, x, config=config.replace(lowering="none"))
    with torch.no_grad():
        want = flat_outputs(plain.module(x))
        for _ in range(2):
            for got, ref in zip(flat_outputs(lowered.module(x)), want):
                assert rel_error(ref, got) < TOL
    with torch.inference_mode():
        for got, ref in zip(flat_outputs(lowered.module(x)), want):
            assert rel_error(ref, got) < TOL
    assert torch.equal(x, kept)
    notes = " ".join(lowered.module.meta.get(NOTES_KEY, []))
    if name in ("monai_dynunet", "monai_segresnet", "monai_unet_in"):
        assert "norms computed from their 1x1 conv's input" in notes
    if name in ("monai_dynunet", "monai_basic_unet", "monai_resnet10"):
        assert "reused buffers" in notes
