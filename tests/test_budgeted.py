"""Budgeted and data-aware compression end to end (issue 15): ``TuckerConfig(target_*=..., data_aware=...,
max_metric_drop=...)`` and ``compress(..., calibration=, evaluate=)``.

Most tests use one small CNN *trained here* (a few seconds, fixed seeds) on a synthetic but learnable
4-class task: the losses that the budgeted search predicts and the covariances of the data-aware factors
mean nothing on random weights. The measured numbers are printed (``pytest -s``);
``benchmarks/budget_report.py`` prints the same comparisons as tables.

The timing test (``target_speedup``) is in the slow tier and asserts only what survives a busy machine.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tucker_fx
from tucker_fx import Plan, TuckerConfig
from tucker_fx.errors import PoorCompressionWarning
from tucker_fx.testing import zoo

# ----------------------------------------------------------------------------------- the trained CNN

SIDE = 12
CLASSES = 4
TRAIN_STEPS = 200
# every compression here: no progress line, no wall-clock speed check (timing belongs to the slow tier)
QUIET = dict(progress=False, speed_check=False)


def make_oriented_gratings(n: int, seed: int, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``n`` RGB ``SIDE x SIDE`` images of a sine grating whose orientation (0, 45, 90, 135
    degrees, jittered) is the class; random frequency and phase, a luminance-like colour (channels
    correlated, as in natural images) and correlated plus independent pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    theta = y.float() * math.pi / CLASSES + 0.15 * torch.randn(n, generator=g)
    freq = 0.22 + 0.1 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    ii, jj = torch.meshgrid(torch.arange(float(SIDE)), torch.arange(float(SIDE)), indexing="ij")
    proj = ii[None] * torch.cos(theta)[:, None, None] + jj[None] * torch.sin(theta)[:, None, None]
    pattern = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    colour = (torch.tensor([1.0, 0.9, 0.7]) * (0.7 + 0.6 * torch.rand(n, 1, generator=g))
              + 0.1 * torch.randn(n, 3, generator=g))
    shared = torch.randn(n, 1, SIDE, SIDE, generator=g) * torch.tensor([1.0, 0.9, 0.8]).view(1, 3, 1, 1)
    own = 0.3 * torch.randn(n, 3, SIDE, SIDE, generator=g)
    return colour[:, :, None, None] * pattern[:, None] + noise * (shared + own), y


class SmallCNN(nn.Module):
    """Three 3x3 convs (3 -> 32 -> 48 -> 48), a max pool, global average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 48, 3, padding=1)
        self.conv3 = nn.Conv2d(48, 48, 3, padding=1)
        self.fc = nn.Linear(48, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


@dataclass
class Trained:
    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    logits: torch.Tensor  # the model's held-out logits
    accuracy: float  # its held-out accuracy

    def calibration(self, batches: int = 4, size: int = 128) -> list[torch.Tensor]:
        """The first ``batches`` training batches (inputs only)."""
        return [self.x_train[i * size:(i + 1) * size] for i in range(batches)]

    @property
    def example(self) -> torch.Tensor:
        return self.x_train[:8]

    def held_out(self, module: nn.Module) -> tuple[float, float]:
        """``(relative logit error against the original, accuracy)`` of ``module`` on the held-out set."""
        with torch.no_grad():
            out = module(self.x_test)
        err = float((out - self.logits).norm() / self.logits.norm())
        return err, float((out.argmax(1) == self.y_test).float().mean())

    def accuracy_of(self, module: nn.Module) -> float:
        return self.held_out(module)[1]


def train_small_cnn(seed: int = 0, steps: int = TRAIN_STEPS) -> Trained:
    """Train :class:`SmallCNN` with Adam (batch 32, lr 3e-3) on 2048 samples; held out: 1024 others.
    One thread and fixed seeds: the same weights on every run of one machine (about 2 s)."""
    x_train, y_train = make_oriented_gratings(2048, seed=1)
    x_test, y_test = make_oriented_gratings(1024, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SmallCNN()
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            order = torch.Generator().manual_seed(3)
            for _ in range(steps):
                idx = torch.randint(0, len(x_train), (32,), generator=order)
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
    accuracy = float((logits.argmax(1) == y_test).float().mean())
    return Trained(model, x_train, y_train, x_test, y_test, logits, accuracy)


@pytest.fixture(scope="module")
def trained() -> Trained:
    t = train_small_cnn()
    assert t.accuracy > 0.9, f"the CNN did not learn the task (held-out accuracy {t.accuracy:.3f})"
    return t


def compress_quiet(model: nn.Module, *inputs: torch.Tensor, **kwargs):
    """``tucker_fx.compress`` with the quality warning silenced (low ranks on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorCompressionWarning)
        return tucker_fx.compress(model, *inputs, **kwargs)


# ------------------------------------------------------------------------------ 1. argument checks


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_speedup=0.5), r"target_speedup: expected a number >= 1"),
    (dict(target_flops_ratio=0.99), r"target_flops_ratio: expected a number >= 1"),
    (dict(target_params_ratio=0), r"target_params_ratio: expected a number >= 1"),
    (dict(target_flops_ratio=True), r"target_flops_ratio: expected a number >= 1 .*got True"),
    (dict(target_speedup=False), r"target_speedup: expected a number >= 1 .*got False"),
    (dict(target_flops_ratio=float("nan")), r"target_flops_ratio: expected a number >= 1"),
    (dict(target_params_ratio=float("inf")), r"target_params_ratio: expected a number >= 1"),
    (dict(target_flops_ratio="4"), r"target_flops_ratio: expected a number >= 1"),
    (dict(target_flops_ratio=2, target_params_ratio=3), r"at most one of .*'target_flops_ratio', 'target_params_ratio'"),
    (dict(target_speedup=2, target_flops_ratio=2), r"at most one of"),
    (dict(target_params_ratio=2, ranks={"conv1": 4}), r"target_params_ratio chooses every layer's ranks.*\['conv1'\]"),
    (dict(target_speedup=2, ranks={"fc": None}), r"target_speedup chooses every layer's ranks"),
    (dict(max_metric_drop=-0.01), r"max_metric_drop: expected a number >= 0, got -0.01"),
    (dict(max_metric_drop=True), r"max_metric_drop: expected a number >= 0"),
    (dict(max_metric_drop=float("nan")), r"max_metric_drop: expected a number >= 0"),
    (dict(data_aware=1), r"data_aware: expected True or False"),
])
def test_config_rejects(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TuckerConfig(**kwargs)


def test_config_accepts_targets() -> None:
    assert TuckerConfig().target is None
    assert TuckerConfig(target_speedup=2).target == ("target_speedup", 2.0)
    assert TuckerConfig(target_flops_ratio=1).target == ("target_flops_ratio", 1.0)  # 1: no cut, still valid
    cfg = TuckerConfig(target_params_ratio=10, rank=0.5, exclude=("fc",), max_metric_drop=0.0, data_aware=True)
    assert cfg.target == ("target_params_ratio", 10.0) and cfg.max_metric_drop == 0.0
    with pytest.raises(ValueError, match="at most one"):
        cfg.replace(target_speedup=2)  # replace validates again


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    return net, torch.randn(2, 3, 10, 10)


def test_data_aware_needs_calibration(tiny) -> None:
    net, x = tiny
    with pytest.raises(ValueError, match=r"data_aware=True\) needs calibration data.*calibration="):
        tucker_fx.compress(net, x, config=TuckerConfig(rank=0.5, data_aware=True, **QUIET))


def test_max_metric_drop_needs_evaluate(tiny) -> None:
    net, x = tiny
    for cfg in (TuckerConfig(max_metric_drop=0.01, **QUIET), TuckerConfig(target_flops_ratio=2, max_metric_drop=0.01, **QUIET)):
        with pytest.raises(ValueError, match=r"max_metric_drop=\.\.\.\) needs evaluate="):
            tucker_fx.compress(net, x, config=cfg)
    with pytest.raises(TypeError, match=r"evaluate: expected a callable module -> float, got int"):
        tucker_fx.compress(net, x, config=TuckerConfig(rank=0.5, **QUIET), evaluate=3)


def test_calibration_one_tensor_is_a_type_error(tiny) -> None:
    net, x = tiny
    with pytest.raises(TypeError, match=r"got one tensor; wrap it: calibration=\[x\]"):
        tucker_fx.compress(net, x, config=TuckerConfig(rank=0.5, data_aware=True, **QUIET), calibration=x)


@pytest.mark.parametrize("calibration, got", [
    ([{"x": torch.randn(2, 3, 10, 10)}], "dict"),
    ([3], "int"),
    (["images"], "str"),
    ([(torch.randn(2, 3, 10, 10), 3)], "tuple"),
    ([()], "tuple"),
    (3, "int"),
])
def test_calibration_items_of_the_wrong_type(tiny, calibration, got) -> None:
    net, x = tiny
    with pytest.raises(TypeError, match=rf"got {got}; for a DataLoader of \(x, y\) pass \(x for x, _ in loader\)"):
        tucker_fx.compress(net, x, config=TuckerConfig(rank=0.5, data_aware=True, **QUIET), calibration=calibration)


def test_calibration_empty_and_generators(tiny) -> None:
    net, x = tiny
    with pytest.raises(ValueError, match="at least one batch, got an empty iterable"):
        tucker_fx.compress(net, x, config=TuckerConfig(rank=0.5, data_aware=True, **QUIET), calibration=[])
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(4, 3, 10, 10, generator=g) for _ in range(3)]
    cfg = TuckerConfig(rank=0.5, data_aware=True, **QUIET)
    from_list = compress_quiet(net, x, config=cfg, calibration=batches)
    from_gen = compress_quiet(net, x, config=cfg, calibration=(b for b in batches))  # read once
    from_tuples = compress_quiet(net, x, config=cfg, calibration=[(b,) for b in batches])
    with torch.no_grad():
        ref = from_list.module(x)
        assert torch.equal(ref, from_gen.module(x)) and torch.equal(ref, from_tuples.module(x))
    assert any("3 batches)" in n and n.startswith("factors: ") for n in from_list.plan["2"].notes)


@pytest.mark.parametrize("config", [TuckerConfig(rank=0.5, data_aware=True, **QUIET),
                                    TuckerConfig(target_flops_ratio=2, **QUIET)], ids=["data_aware", "target"])
def test_calibration_of_x_y_pairs_is_a_type_error(tiny, config) -> None:
    net, x = tiny
    pairs = [(x, torch.tensor([0, 1]))]  # what iterating a DataLoader of (inputs, labels) gives
    with pytest.raises(TypeError, match=r"\(x for x, _ in loader\)"):
        compress_quiet(net, x, config=config, calibration=pairs)


# ------------------------------------------------------------------- 2. data-aware is exact at full rank


class SmallConv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv3d(12, 16, 3, padding=1, bias=False)
        self.conv3 = nn.Conv3d(16, 16, (1, 3, 3), stride=(1, 2, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.relu(self.conv3(x)).mean((2, 3, 4)))


def _small_conv2d() -> tuple[nn.Module, tuple[int, ...]]:
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(24 * 8 * 8, 10))
    zoo.randomize_norms(net)
    return net, (2, 3, 8, 8)


def _mlp() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 5)), (8, 20)


@pytest.mark.parametrize("build", [_small_conv2d, lambda: (SmallConv3d(), (2, 3, 4, 8, 8)), _mlp],
                         ids=["conv2d", "conv3d", "mlp"])
def test_data_aware_at_full_rank_is_exact(build) -> None:
    torch.manual_seed(0)
    net, shape = build()
    net.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    # correlated, offset calibration data (a covariance far from identity), few positions for the MLP
    mix = torch.randn(shape[1], shape[1], generator=g)
    calibration = [torch.einsum("ij,nj...->ni...", mix, torch.randn(shape, generator=g)) + 0.5 for _ in range(3)]
    result = tucker_fx.compress(net, x, config=TuckerConfig(rank=1.0, only_if_cheaper=False, data_aware=True, **QUIET),
                                calibration=calibration)
    applied = result.plan.applied
    assert len(applied) >= 3
    aware = [e.name for e in applied if e.factors == "data"]
    assert aware, "no layer got data-aware factors"
    for e in applied:
        assert e.ranks is not None and e.full_ranks is not None
    with torch.no_grad():
        for inp in (x, calibration[0]):
            ref, out = net(inp), result.module(inp)
            assert zoo.rel_error(ref, out) < 1e-5, (aware, zoo.rel_error(ref, out))


# ----------------------------------------------------------- 3. data-aware beats weight-only on a trained CNN


def test_data_aware_beats_weight_only_on_the_trained_cnn(trained) -> None:
    # the same fixed ranks for both: a quarter of each conv's full ranks; the 48 -> 4 head is left alone
    # (at rank 0.25 its SVD would have rank 1, which ruins both variants alike)
    cfg = TuckerConfig(rank=0.25, exclude=("fc",), **QUIET)
    weight_only = compress_quiet(trained.model, trained.example, config=cfg)
    aware = compress_quiet(trained.model, trained.example, config=cfg.replace(data_aware=True),
                           calibration=trained.calibration(4))
    assert [(e.name, e.kind, e.ranks) for e in aware.plan] == [(e.name, e.kind, e.ranks) for e in weight_only.plan]
    # conv1 is Tucker-1 (output mode, full rank min(32, 3*3*3) = 27); conv2, conv3 Tucker-2
    assert [e.ranks for e in aware.plan.applied] == [(7,), (8, 12), (12, 12)]
    assert aware.flops_ratio == pytest.approx(weight_only.flops_ratio)
    err_w, acc_w = trained.held_out(weight_only.module)
    err_a, acc_a = trained.held_out(aware.module)
    print(f"\n[trained CNN, rank 0.25, FLOPs x{aware.flops_ratio:.2f}] original accuracy {trained.accuracy:.4f}; "
          f"weight-only: logit error {err_w:.4f}, accuracy {acc_w:.4f}; data-aware: logit error {err_a:.4f}, "
          f"accuracy {acc_a:.4f} ({1 - err_a / err_w:.0%} lower error)")
    assert err_a <= 0.8 * err_w, (err_a, err_w)
    assert acc_a >= acc_w - 0.01, (acc_a, acc_w)


@pytest.mark.parametrize("rank", [0.5, 0.25, 0.125])
def test_data_aware_at_several_ranks_on_the_trained_cnn(trained, rank) -> None:
    # the floor (>= 20% lower held-out error at the same ranks, accuracy not over a point lower), at
    # every rank of benchmarks/budget_report.py's table (a)
    cfg = TuckerConfig(rank=rank, exclude=("fc",), **QUIET)
    weight_only = compress_quiet(trained.model, trained.example, config=cfg)
    aware = compress_quiet(trained.model, trained.example, config=cfg.replace(data_aware=True),
                           calibration=trained.calibration(4))
    (err_w, acc_w), (err_a, acc_a) = trained.held_out(weight_only.module), trained.held_out(aware.module)
    assert err_a <= 0.8 * err_w, (err_a, err_w)
    assert acc_a >= acc_w - 0.01, (acc_a, acc_w)


class _LinReluLin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)))


def _lin_relu_lin() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(3)
    net = _LinReluLin().eval()
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(12, 12, generator=g)
    return net, [torch.randn(64, 12, generator=g) @ mix + 0.3 for _ in range(3)]


def test_sequential_statistics_are_those_the_compressed_layers_produce() -> None:
    # each layer's factors are fitted to the inputs that the compressed layers before it produce; its bias
    # takes in their mean drift, so the last layer's mean output on the calibration data is the original's
    net, calibration = _lin_relu_lin()
    x = calibration[0][:8]
    plan = compress_quiet(net, x, config=TuckerConfig(ranks={"a": 3, "b": 2}, only_if_cheaper=False, **QUIET)).plan
    for e in plan:
        e.factors = "data"
    r = tucker_fx.apply_plan(net, plan, x, config=TuckerConfig(data_aware=True, **QUIET), calibration=calibration)
    assert [e.factors for e in r.plan.applied] == ["data", "data"]
    data = torch.cat(calibration)
    with torch.no_grad():
        original, compressed = net(data), r.module(data)
        assert zoo.rel_error(original, compressed) > 1e-3  # a real approximation, not the identity
        assert torch.allclose(compressed.mean(0), original.mean(0), atol=1e-5), (compressed.mean(0), original.mean(0))
        # and the drift was real: a's block changes the mean of relu(a(x)) that b sees
        first = r.module.get_submodule("a")
        assert not torch.allclose(F.relu(first(data)).mean(0), F.relu(net.a(data)).mean(0), atol=1e-3)


def test_compress_and_apply_plan_build_the_same_data_aware_model(trained) -> None:
    cfg = TuckerConfig(rank=0.25, exclude=("fc",), data_aware=True, **QUIET)
    calibration = trained.calibration(3)
    r = compress_quiet(trained.model, trained.example, config=cfg, calibration=calibration)
    assert any(e.factors == "data" for e in r.plan.applied)
    assert any("with the layers before it compressed" in n for e in r.plan.applied for n in e.notes)
    again = tucker_fx.apply_plan(trained.model, r.plan, trained.example, config=TuckerConfig(data_aware=True, **QUIET),
                                 calibration=calibration)
    assert [e.factors for e in again.plan.applied] == [e.factors for e in r.plan.applied]
    with torch.no_grad():
        assert zoo.rel_error(r.module(trained.x_test), again.module(trained.x_test)) < 1e-6


# -------------------------------------------------------------------------------- 4. the targets


def test_target_flops_ratio_on_the_trained_cnn(trained) -> None:
    r = compress_quiet(trained.model, trained.example, config=TuckerConfig(target_flops_ratio=4, **QUIET),
                       calibration=trained.calibration(2))
    print(f"\n[trained CNN, target_flops_ratio=4] FLOPs x{r.flops_ratio:.3f}, params x{r.params_ratio:.3f}, "
          f"held-out (error, accuracy) {trained.held_out(r.module)}; ranks "
          f"{[(e.name, e.ranks) for e in r.plan.applied]}")
    assert 4.0 <= r.flops_ratio <= 5.0
    assert r.search is not None and r.search.target == "target_flops_ratio" and r.search.ratio == 4.0
    assert r.search.allocation is not None and r.search.allocation.feasible
    assert r.plan.applied and all(e.rank_source == "budget" for e in r.plan.applied)
    for e in r.plan:
        assert e.predicted_loss is not None and e.predicted_loss >= 0 and e.budget_cost is not None
        assert e.measured_cost is None  # timed only for a speed target
        assert e.budget_cost == (e.macs_after if e.applied else e.macs_before)
    assert any(n.startswith("budget: target_flops_ratio=4 (MACs)") for n in r.plan.notes)


def test_target_params_ratio_on_the_trained_cnn(trained) -> None:
    r = compress_quiet(trained.model, trained.example, config=TuckerConfig(target_params_ratio=10, **QUIET),
                       calibration=trained.calibration(2))
    print(f"\n[trained CNN, target_params_ratio=10] params x{r.params_ratio:.3f}, FLOPs x{r.flops_ratio:.3f}, "
          f"held-out (error, accuracy) {trained.held_out(r.module)}")
    assert r.params_ratio >= 10.0
    for e in r.plan:
        assert e.budget_cost == (e.params_after if e.applied else e.params_before)


@pytest.mark.skipif(not zoo.available("monai_resnet10"), reason="needs monai")
@pytest.mark.parametrize("target, bounds", [("target_flops_ratio", (4.0, 5.0)), ("target_params_ratio", (10.0, math.inf))])
def test_targets_on_a_3d_resnet(target, bounds) -> None:
    """MONAI ResNet-10 (a quarter of its width) at 16^3: random weights, so only the ratios are checked."""
    model, x = zoo.build("monai_resnet10")
    g = torch.Generator().manual_seed(7)
    value = 4 if target == "target_flops_ratio" else 10
    r = compress_quiet(model, x, config=TuckerConfig(**{target: value}, **QUIET),
                       calibration=[x, torch.randn(x.shape, generator=g)])
    ratio = r.flops_ratio if target == "target_flops_ratio" else r.params_ratio
    print(f"\n[monai_resnet10 16^3, {target}={value}] FLOPs x{r.flops_ratio:.3f}, params x{r.params_ratio:.3f}, "
          f"search {r.search.seconds:.1f} s, {len(r.plan.applied)}/{len(r.plan)} layers decomposed")
    assert bounds[0] <= ratio <= bounds[1]
    assert r.validation is not None and r.validation.rel_error < 1.0  # ran, and is not garbage


@pytest.mark.parametrize("rank", [0.375, 0.25])
def test_budgeted_ranks_beat_uniform_ranks_at_the_same_flops(trained, rank) -> None:
    uniform = compress_quiet(trained.model, trained.example, config=TuckerConfig(rank=rank, exclude=("fc",), **QUIET))
    budgeted = compress_quiet(trained.model, trained.example,
                              config=TuckerConfig(target_flops_ratio=uniform.flops_ratio, exclude=("fc",), **QUIET),
                              calibration=trained.calibration(2))
    err_u, acc_u = trained.held_out(uniform.module)
    err_b, acc_b = trained.held_out(budgeted.module)
    print(f"\n[trained CNN] uniform rank={rank}: FLOPs x{uniform.flops_ratio:.3f}, logit error {err_u:.4f}, "
          f"accuracy {acc_u:.4f}, ranks {[e.ranks for e in uniform.plan.applied]}; budgeted at that ratio: FLOPs "
          f"x{budgeted.flops_ratio:.3f}, logit error {err_b:.4f}, accuracy {acc_b:.4f}, ranks "
          f"{[(e.name, e.ranks) for e in budgeted.plan.applied]}")
    assert budgeted.flops_ratio >= uniform.flops_ratio * (1 - 1e-9)
    assert budgeted.plan["fc"].kind == "none"  # exclude= is kept
    assert err_b <= err_u


def test_an_unreachable_target_is_reported(trained) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = tucker_fx.compress(trained.model, trained.example, config=TuckerConfig(target_flops_ratio=1000, **QUIET),
                               calibration=trained.calibration(1))
    assert r.flops_ratio < 1000 and r.search.allocation is not None and not r.search.allocation.feasible
    said = [str(w.message) for w in caught if not issubclass(w.category, PoorCompressionWarning)] + r.plan.notes
    assert any(re.search(r"cannot be met|infeasible|not met|missed", s, re.IGNORECASE) for s in said), said


# ------------------------------------------------------------------------ 5. evaluate + max_metric_drop


def test_max_metric_drop_on_the_trained_cnn(trained) -> None:
    limit = 0.01
    calls = []

    def accuracy(module: nn.Module) -> float:
        calls.append(type(module).__name__)
        return trained.accuracy_of(module)

    r = tucker_fx.compress(trained.model, trained.example, config=TuckerConfig(max_metric_drop=limit, **QUIET),
                           calibration=trained.calibration(2, size=64), evaluate=accuracy)
    assert r.metric is not None and set(r.metric) == {"original", "compressed", "drop"}
    assert r.metric["original"] == pytest.approx(trained.accuracy)
    assert r.metric["compressed"] == pytest.approx(trained.accuracy_of(r.module))
    assert r.metric["drop"] == pytest.approx(r.metric["original"] - r.metric["compressed"])
    assert r.metric["drop"] <= limit
    assert r.config.max_metric_drop == limit and r.config.target is None
    note = next(n for n in r.plan.notes if n.startswith(f"max_metric_drop={limit:g}: tried "))
    tried = [(float(a), float(b)) for a, b in re.findall(r"x([\d.]+) FLOPs: drop (-?[\d.e+-]+)", note)]
    print(f"\n[trained CNN, max_metric_drop={limit}] {note}; chosen FLOPs x{r.flops_ratio:.3f}, metric {r.metric}")
    assert [t for t, _ in tried] == [2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0][:len(tried)]
    within = [t for t, d in tried if d <= limit]
    assert within, "the x2 FLOPs cut already broke the limit on this net"
    # the largest ratio within the limit was kept; every ratio before the first miss was within it
    assert r.search is not None and r.search.ratio == max(within)
    assert r.flops_ratio >= max(within)
    assert [t for t, d in tried if d > limit] in ([], [tried[-1][0]])
    assert len(calls) >= 2 * len(tried)  # the original and each compressed model were evaluated


def test_evaluate_with_a_target(trained) -> None:
    r = compress_quiet(trained.model, trained.example, config=TuckerConfig(target_flops_ratio=3, **QUIET),
                       calibration=trained.calibration(2, size=64), evaluate=trained.accuracy_of)
    assert r.metric["compressed"] == pytest.approx(trained.accuracy_of(r.module))
    assert any(n.startswith("metric: original ") for n in r.plan.notes)
    # a limit that the result cannot meet with a target: a warning (the target is kept), not a search
    with pytest.warns(PoorCompressionWarning, match=r"over TuckerConfig.max_metric_drop=0"):
        tucker_fx.compress(trained.model, trained.example,
                           config=TuckerConfig(target_flops_ratio=3, max_metric_drop=0.0, **QUIET),
                           calibration=trained.calibration(2, size=64), evaluate=lambda m: -trained.held_out(m)[0])


# ------------------------------------------------------------- 6. the budgeted plan: print, save, re-apply


def test_budgeted_plan_prints_saves_and_reapplies(trained, tmp_path) -> None:
    r = compress_quiet(trained.model, trained.example, config=TuckerConfig(target_flops_ratio=4, **QUIET),
                       calibration=trained.calibration(2))
    text = str(r.plan)
    header = text.splitlines()[0]
    assert "predicted loss" in header and "cost (predicted / measured)" in header
    for e in r.plan.applied:
        row = next(line for line in text.splitlines() if line.startswith(f"| {e.name} |"))
        assert f"{e.predicted_loss:.3g}" in row
    path = tmp_path / "plan.json"
    r.plan.save(path)
    loaded = Plan.load(path)
    assert [(e.name, e.kind, e.ranks, e.predicted_loss, e.budget_cost, e.measured_cost, e.rank_source)
            for e in loaded] == [(e.name, e.kind, e.ranks, e.predicted_loss, e.budget_cost, e.measured_cost,
                                  e.rank_source) for e in r.plan]
    again = tucker_fx.apply_plan(trained.model, loaded, trained.example, config=TuckerConfig(**QUIET))
    assert [(e.name, e.kind, e.ranks) for e in again.plan.applied] == [(e.name, e.kind, e.ranks) for e in r.plan.applied]
    assert again.flops_ratio == pytest.approx(r.flops_ratio)
    with torch.no_grad():  # weight-only factors: the same model again
        assert zoo.rel_error(r.module(trained.x_test), again.module(trained.x_test)) < 1e-6


# ---------------------------------------------------------------------------- 7. target_speedup


def _fake_samples(fns, *, repeats=7, **_):
    """compare_samples without the clock: every callable 1 ms (what is timed is what is checked)."""
    return {k: [1.0] * repeats for k in fns}


@pytest.mark.parametrize("net, shape, fast_layers", [
    (nn.Sequential(nn.Conv3d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv3d(32, 32, 3, padding=1)), (1, 8, 4, 16, 16), 2),
    (nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1)), (1, 16, 16, 16), 1),
], ids=["mkldnn3d", "pointwise2d"])
def test_speed_search_times_untouched_layers_with_the_fast_kernels(monkeypatch, net, shape, fast_layers) -> None:
    import tucker_fx.api as api
    import tucker_fx.search.budgeted as budgeted
    from tucker_fx.kernels.pointwise import MkldnnConv, PointwiseConv

    fast = (MkldnnConv, PointwiseConv)
    net = copy.deepcopy(net).eval()
    x = torch.randn(shape)
    # the premise: the lowering passes that compress ends with give these layers a fast kernel
    lowered = tucker_fx.lower(net, x)
    assert sum(isinstance(m, fast) for m in lowered.modules()) == fast_layers
    # what the search times for each layer's "original" option (the modules it builds; no clock needed)
    timed: list[nn.Module] = []
    real_fast = budgeted._fast

    def spy(module: nn.Module, inp: torch.Tensor) -> nn.Module:
        out = real_fast(module, inp)
        timed.append(out)
        return out

    monkeypatch.setattr(budgeted, "_fast", spy)
    monkeypatch.setattr(budgeted, "compare_samples", _fake_samples)
    monkeypatch.setattr(api, "compare_samples", _fake_samples)
    compress_quiet(net, x, config=TuckerConfig(target_speedup=1.5, **QUIET), calibration=[x])
    # a TuckerBlock traced keeps its first/core/last submodules; the original layers have none
    originals = [m for m in timed if not any(name.rpartition(".")[2] == "core" for name, _ in m.named_modules())]
    assert len(originals) == 2, [type(m).__name__ for m in timed]
    assert sum(any(isinstance(m, fast) for m in o.modules()) for o in originals) == fast_layers


def test_speed_search_times_each_option_lowered_as_the_pipeline_will(monkeypatch) -> None:
    # THETIS's first conv (5 x 11 x 11) runs as an FFT conv in the compressed model, its blocks too: the
    # search must time those, not ATen's direct conv (which made it predict x1.2 where it measured x7)
    import tucker_fx.api as api
    import tucker_fx.search.budgeted as budgeted
    from tucker_fx.kernels.fft_conv import FFTConv, TuckerFFTConv

    net = nn.Sequential(nn.Conv3d(4, 6, (5, 11, 11), padding=(2, 5, 5)), nn.ReLU(), nn.Conv3d(6, 8, 1)).eval()
    x = torch.randn(1, 4, 8, 40, 64)
    timed: list[nn.Module] = []
    real_fast = budgeted._fast
    monkeypatch.setattr(budgeted, "_fast", lambda m, inp: timed.append(m) or real_fast(m, inp))
    monkeypatch.setattr(budgeted, "compare_samples", _fake_samples)
    monkeypatch.setattr(api, "compare_samples", _fake_samples)
    compress_quiet(net, x, config=TuckerConfig(target_speedup=1.5, exclude=("2",), **QUIET), calibration=[x])
    kinds = [type(m[0]).__name__ for m in timed]
    assert kinds[0] == "FFTConv", kinds  # the layer left alone, as lower_kept_convs runs it
    assert all(isinstance(m[0], (FFTConv, TuckerFFTConv)) for m in timed), kinds  # every option: FFT here
    # lowering="none": neither lowering stage runs, so the options are timed as the plain modules
    timed.clear()
    compress_quiet(net, x, config=TuckerConfig(target_speedup=1.5, exclude=("2",), lowering="none", **QUIET),
                   calibration=[x])
    assert timed and not any(isinstance(m[0], (FFTConv, TuckerFFTConv)) for m in timed), [type(m[0]) for m in timed]


class ConvStack3d(nn.Module):
    """Three wide 3x3x3 convs: at 16 x 8 x 24 x 24 the convs are nearly all of the time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(16, 64, 3, padding=1)
        self.conv2 = nn.Conv3d(64, 64, 3, padding=1)
        self.conv3 = nn.Conv3d(64, 64, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


@pytest.mark.slow
def test_target_speedup_runs_the_measured_search() -> None:
    import statistics

    from tucker_fx._internal.timing import compare_samples

    torch.manual_seed(0)
    net = ConvStack3d().eval()
    # weights of exact multilinear rank 16 at both channel modes: a choice at rank >= 16 loses nothing, so
    # the search (which pays loss only where the budget needs it) must give a model equal to the original;
    # on random full-rank weights any rank-16 model is ~100% off, and that proves nothing either way
    with torch.no_grad():
        for conv in (net.conv1, net.conv2, net.conv3):
            out_c, in_c = conv.weight.shape[:2]
            core = torch.randn(16, min(16, in_c), 3, 3, 3)
            u, v = torch.randn(out_c, 16), torch.randn(in_c, min(16, in_c))
            conv.weight.copy_(torch.einsum("abxyz,oa,ib->oixyz", core, u, v) / (16 * 27) ** 0.5 / in_c ** 0.5)
    x = torch.randn(1, 16, 8, 24, 24)
    # the premise: decomposing speeds this net up beyond what lowering its convs alone does (lowering
    # alone measured ~x5 against ATen's convs, rank 0.25 ~x9, on 1 core); the target lies between the
    # two, so the search must decompose (a target that lowering alone meets is met leaving every layer
    # alone, with no loss: that is the right answer, not this test's)
    quarter = compress_quiet(net, x, config=TuckerConfig(rank=0.25, **QUIET))
    lowered = tucker_fx.lower(net, x)
    samples = compare_samples({"original": lambda: net(x), "lowered": lambda: lowered(x),
                               "rank 0.25": lambda: quarter.module(x)}, repeats=5)
    med = {k: statistics.median(v) for k, v in samples.items()}
    premise, alone = med["original"] / med["rank 0.25"], med["original"] / med["lowered"]
    print(f"\n[ConvStack3d 16x8x24x24] rank 0.25: FLOPs x{quarter.flops_ratio:.2f}, measured x{premise:.2f}; "
          f"lowering alone x{alone:.2f}")
    assert premise >= 1.5 * alone, samples
    # nearer lowering alone than rank 0.25: ranks 16 meet it with room for the search's own timing noise
    # (at the midpoint, a run with the other core busy measured ranks 16 just under it and took 8)
    target = round(alone + 0.35 * (premise - alone), 2)

    r = compress_quiet(net, x, config=TuckerConfig(target_speedup=target, progress=False), calibration=[x])
    assert r.search is not None and r.search.target == "target_speedup" and r.search.unit == "ms"
    rounds = r.search.rounds
    assert 1 <= len(rounds) <= 3 and all("measured_ratio" in row for row in rounds)
    print(f"[ConvStack3d, target_speedup={target}] rounds {rounds}; speed check {r.timing and r.timing['speedup']:.2f}; "
          f"search {r.search.seconds:.1f} s; plan\n{r.plan}")
    assert rounds[-1]["measured_ratio"] > 1.0
    assert r.plan.applied
    for e in r.plan.applied:
        assert e.rank_source == "budget" and e.predicted_loss is not None
        assert e.budget_cost is not None and e.budget_cost > 0
        assert e.measured_cost is not None and e.measured_cost > 0
    assert any("measured x" in n for n in r.plan.notes)
    met = not any("was not met" in n for n in r.plan.notes)
    with torch.no_grad():
        err = zoo.rel_error(net(x), r.module(x))
    if met:
        # lower ranks cost loss, and a target that ranks 16 meet does not need them: the model is exact
        for e in r.plan.applied:
            assert min(e.ranks) >= 16, (e.name, e.ranks)
        assert err < 1e-3
    else:
        # the premise's timing and the search's disagreed (a busy machine; seen once in CI: the premise
        # measured the original 5x slower than the search did): the search says so, and gives its closest
        assert rounds[-1]["feasible"] is False or max(row["measured_ratio"] for row in rounds) < target
        assert torch.isfinite(torch.as_tensor(err))
