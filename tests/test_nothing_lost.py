"""Nothing lost: the user's model and the process's global state are as they were after
analyze / compress / validate / apply_plan / lower / save / load, also when one of them fails midway."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import tensorly
import torch
import torch.nn as nn
import torch.nn.functional as F

import tucker_fx
from tucker_fx import TuckerConfig
from tucker_fx.passes import blocks


class Net(nn.Module):
    """Conv-BN in training mode, an eval-mode head, a frozen layer, a buffer, hooks on a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        return self.head(F.relu(self.conv2(x)) * self.scale)


def make_model() -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model = Net().train()
    model.head.eval()  # mixed training flags
    model.conv2.weight.requires_grad_(False)  # a frozen layer
    calls: list[str] = []
    model.conv1.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    model.conv1.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    model.head.register_full_backward_hook(lambda m, gi, go: calls.append("bwd"))
    return model, calls


X = torch.randn(2, 3, 8, 8)
pytestmark = pytest.mark.filterwarnings("ignore:For backward hooks to be called:UserWarning")  # tracing the hooked head


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about the model that a tucker_fx call must leave as it was."""
    hooks = {}
    for name, m in model.named_modules():
        hooks[name] = [list(d.items()) for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                                 m._backward_pre_hooks, m._state_dict_hooks,
                                                 m._load_state_dict_pre_hooks)]
    return {
        "params": [(k, id(p), p.detach().clone(), p.requires_grad, p.device, p.dtype, p.grad)
                   for k, p in model.named_parameters()],
        "buffers": [(k, id(b), b.clone(), b.device) for k, b in model.named_buffers()],
        "training": [(k, m.training) for k, m in model.named_modules()],
        "modules": [(k, id(m), type(m)) for k, m in model.named_modules()],
        "hooks": hooks,
    }


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN included."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_same(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    assert [p[:2] + p[3:6] for p in after["params"]] == [p[:2] + p[3:6] for p in before["params"]]
    assert all(_same_values(a[2], b[2]) for a, b in zip(after["params"], before["params"]))
    assert all(a[6] is b[6] for a, b in zip(after["params"], before["params"]))  # .grad untouched
    assert [(b[0], b[1], b[3]) for b in after["buffers"]] == [(b[0], b[1], b[3]) for b in before["buffers"]]
    assert all(_same_values(a[2], b[2]) for a, b in zip(after["buffers"], before["buffers"]))
    assert after["training"] == before["training"]
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]


def global_state() -> dict[str, Any]:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    return {
        "tensorly backend": tensorly.get_backend(),
        "threads": torch.get_num_threads(),
        "interop threads": torch.get_num_interop_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "matmul precision": torch.get_float32_matmul_precision(),
        "cpu rng": torch.get_rng_state(),
        "inductor config": {k: v for k, v in inductor_config.get_config_copy().items() if _plain(v)},
        "dynamo config": {k: v for k, v in torch._dynamo.config.get_config_copy().items() if _plain(v)},
    }


def _plain(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str, type(None), tuple, list, dict))


def assert_globals(before: dict[str, Any]) -> None:
    after = global_state()
    assert torch.equal(after.pop("cpu rng"), before["cpu rng"]), "torch's random state moved"
    assert after == {k: v for k, v in before.items() if k != "cpu rng"}


# --- calls that succeed ------------------------------------------------------------------------------

def _calls() -> dict[str, Callable[[nn.Module], Any]]:
    cfg = TuckerConfig(rank=0.5, progress=False, tuning_cache=False)
    return {
        "analyze": lambda m: tucker_fx.analyze(m, X),
        "compress": lambda m: tucker_fx.compress(m, X, config=cfg),
        "compress, nothing to decompose": lambda m: tucker_fx.compress(m, X, config=cfg.replace(exclude=("*",))),
        "compress, lowering none": lambda m: tucker_fx.compress(m, X, config=cfg.replace(lowering="none", merge=False)),
        "compress, meta inputs": lambda m: tucker_fx.compress(m, X.to("meta"), config=cfg.replace(validate=False)),
        "apply_plan": lambda m: tucker_fx.apply_plan(m, tucker_fx.compress(copy.deepcopy(m), X, config=cfg).plan, X,
                                                     config=cfg),
        "validate": lambda m: tucker_fx.validate(m, tucker_fx.compress(copy.deepcopy(m), X, config=cfg).module, X),
        "lower": lambda m: tucker_fx.lower(m, X, tune=False, tuning_cache=False),
    }


@pytest.mark.parametrize("call", sorted(_calls()))
def test_model_and_globals_unchanged(call):
    model, calls = make_model()
    tucker_fx.analyze(model, X)  # the first call in a process imports torch._dynamo: not a change of state
    before, state = snapshot(model), global_state()
    _calls()[call](model)
    assert_same(before, model)
    assert_globals(state)
    if call in ("analyze", "lower", "compress, meta inputs"):
        assert calls == []  # nothing ran
    else:  # validation runs a copy of the model, forward hooks included, and never trains it
        assert set(calls) <= {"pre", "fwd"}
    calls.clear()
    model(X).sum().backward()  # the model still works, hooks and all
    assert calls == ["pre", "fwd", "bwd"]


def test_analyze_never_calls_hooks_or_moves_batchnorm_counters():
    model, calls = make_model()
    tracked = model.bn.num_batches_tracked.clone()
    tucker_fx.analyze(model, X)
    assert calls == [] and torch.equal(model.bn.num_batches_tracked, tracked)


def test_save_and_load_leave_model_and_globals_alone(tmp_path):
    model, _ = make_model()
    result = tucker_fx.compress(copy.deepcopy(model), X, config=TuckerConfig(rank=0.5, progress=False))
    before, state = snapshot(model), global_state()
    path = tucker_fx.save(result, tmp_path / "net")
    loaded = tucker_fx.load(path, model, X)
    assert_same(before, model)
    assert_globals(state)
    with torch.no_grad():
        assert torch.equal(loaded.module(X), result.module(X))


def test_compressed_module_owns_its_tensors():
    """No parameter or buffer of the result is shared with the user's model."""
    model, _ = make_model()
    result = tucker_fx.compress(model, X, config=TuckerConfig(rank=0.5, progress=False, exclude=("conv2",)))
    user = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
    mine = {t.data_ptr() for t in list(result.module.parameters()) + list(result.module.buffers()) if t.numel()}
    assert not user & mine
    before = snapshot(model)
    with torch.no_grad():
        for t in list(result.module.parameters()) + list(result.module.buffers()):
            t.fill_(7)
    assert_same(before, model)


# --- calls that fail midway --------------------------------------------------------------------------

def _nan_model() -> tuple[nn.Module, list[str]]:
    model, calls = make_model()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    return model, calls


def _failing() -> dict[str, tuple[Callable[[nn.Module], Any], type, str]]:
    """The failing calls; everything they need is built here, before the snapshots."""
    cfg = TuckerConfig(rank=0.5, progress=False, tuning_cache=False)
    wrong_x = torch.randn(2, 5, 8, 8)
    other_plan = tucker_fx.compress(nn.Sequential(nn.Conv2d(3, 8, 3)), X, config=cfg).plan
    other_model = nn.Conv2d(3, 4, 1)
    return {
        "NaN weights": (lambda m: tucker_fx.compress(m, X, config=cfg), tucker_fx.DecompositionError, "NaN/Inf"),
        "bad override name": (lambda m: tucker_fx.compress(m, X, config=cfg.replace(ranks={"conv9": 2})),
                              ValueError, "do not exist"),
        "override above full rank": (lambda m: tucker_fx.compress(m, X, config=cfg.replace(ranks={"conv2": (99, 2)})),
                                     ValueError, "expected 1 <= R_s <= 16"),
        "wrong input shape": (lambda m: tucker_fx.compress(m, wrong_x, config=cfg), tucker_fx.ShapePropagationError,
                              "conv1"),
        "plan of another model": (lambda m: tucker_fx.apply_plan(m, other_plan, X, config=cfg), ValueError,
                                  "do not exist"),
        "validate against another model": (lambda m: tucker_fx.validate(m, other_model, X), ValueError,
                                           "outputs differ in structure"),
        "validate, wrong input shape": (lambda m: tucker_fx.validate(m, other_model, wrong_x),
                                        tucker_fx.ShapePropagationError, "original model does not take"),
        "analyze, wrong input count": (lambda m: tucker_fx.analyze(m, X, X), tucker_fx.ShapePropagationError,
                                       "takes 1 input"),
    }


@pytest.mark.parametrize("case", ["NaN weights", "bad override name", "override above full rank",
                                  "wrong input shape", "plan of another model", "validate against another model",
                                  "validate, wrong input shape", "analyze, wrong input count"])
def test_failure_leaves_model_and_globals_unchanged(case):
    model, _ = _nan_model() if case == "NaN weights" else make_model()
    tucker_fx.analyze(model, X)
    call, error, match = _failing()[case]
    before, state = snapshot(model), global_state()
    with pytest.raises(error, match=match):
        call(model)
    assert_same(before, model)
    assert_globals(state)


def test_failure_in_the_middle_of_the_rewrite(monkeypatch):
    """The second layer's decomposition fails after the first block was built and spliced in."""
    model, _ = make_model()
    tucker_fx.analyze(model, X)
    real, seen = blocks.tucker2, []

    def flaky(*args: Any, **kwargs: Any):
        seen.append(1)
        if len(seen) == 2:
            raise ValueError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(blocks, "tucker2", flaky)
    before, state = snapshot(model), global_state()
    config = TuckerConfig(rank=0.5, policy="paper", progress=False, ranks={"conv1": (2, 8), "conv2": (8, 8)})
    with pytest.raises(tucker_fx.DecompositionError, match="'conv2': injected failure"):
        tucker_fx.compress(model, X, config=config)
    assert len(seen) == 2
    assert_same(before, model)
    assert_globals(state)
