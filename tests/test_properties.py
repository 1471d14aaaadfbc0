"""Property-based tests: random conv/linear geometries, dtypes and configs.

For every drawn layer:

- full-rank compression reproduces the layer within the dtype's tolerance (``TOLERANCE``,
  docs/dtypes.md), with the plain three-conv chain and with the default lowering and merges;
- ``tucker_fx.analyze`` counts the FLOPs that ``FlopCounterMode`` counts, on the original and on
  the compressed graph, and the parameters follow the formulas of docs/compress.md;
- every layer the plan leaves alone says why;
- ``tucker_fx.save`` then ``tucker_fx.load`` give a module with identical outputs.

Layers: Conv1d/2d/3d (kernel sizes from 1, anisotropic; stride; integer, tuple, 'same', 'valid'
padding; dilation; the four padding modes; groups; bias on and off; batch and channels from 1;
contiguous, channels-last and unbatched inputs) and Linear layers (any leading dims), in float64,
float32, bfloat16 or float16 (on the CPU; float16 also on CUDA where there is one).

Profiles (``HYPOTHESIS_PROFILE``): ``fast`` (the fast loop, plain ``pytest``: a third of ``ci``'s
examples), ``ci`` (with ``--run-slow``, the README's full test command: few examples,
derandomized, no database, so every run tests the same cases) and ``local`` (many more, random).
tests/conftest.py picks ``fast`` or ``ci`` unless ``HYPOTHESIS_PROFILE`` is set.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Union

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import tucker_fx
from tucker_fx import TuckerConfig

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "fast", max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "local", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
EXAMPLES = settings.default.max_examples
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# error of the full-rank compressed layer's output (docs/dtypes.md): relative L2 for float64/32,
# relative to the size of the products (``magnitude``) for the 16-bit types
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
FULL = TuckerConfig(rank=1.0, only_if_cheaper=False, lowering="none", merge=False, progress=False)
DEFAULT_LOWERING = TuckerConfig(rank=1.0, only_if_cheaper=False, progress=False, tuning_cache=False)


def rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref64, out64 = ref.detach().double(), out.detach().double()
    denom = ref64.norm().item()
    diff = (ref64 - out64).norm().item()
    return diff / denom if denom > 0 else diff


def magnitude(layer: nn.Module, x: torch.Tensor) -> float:
    """``|| |W| * |x| + |b| ||`` in float64: the size of the products that a layer's outputs sum,
    which rounding scales with (equal to ``||y||`` when nothing cancels)."""
    absolute = copy.deepcopy(layer).double()
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
        return absolute(x.detach().double().abs()).norm().item()


def error(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """The error that ``TOLERANCE`` bounds: 16-bit outputs that nearly cancel (a 6 -> 1 Linear,
    say) have no relative accuracy left, so there it is measured against the products' size."""
    if x.dtype not in SIXTEEN_BIT:
        return rel(y, y_hat)
    diff = (y.detach().double() - y_hat.detach().double()).norm().item()
    scale = magnitude(layer, x)
    return diff / scale if scale > 0 else diff


def oracle_flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


# --- strategies -------------------------------------------------------------------------------------

@dataclass
class Case:
    """A layer and an input that it accepts."""

    layer: nn.Module
    x: torch.Tensor
    override: Any  # ranks override for the layer "0": None (policy decides) or full ranks forced
    kind: str  # the kind the plan must pick at full rank

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Case({self.layer!r}, x={tuple(self.x.shape)} {self.x.dtype}, override={self.override!r})"


DTYPES = st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])


def _per_dim(draw: Any, dims: int, values: st.SearchStrategy) -> Union[int, tuple[int, ...]]:
    """An int for every dim, or an (anisotropic) tuple."""
    if draw(st.booleans()):
        return draw(values)
    return tuple(draw(values) for _ in range(dims))


@st.composite
def conv_cases(draw: Any, dtypes: st.SearchStrategy = DTYPES) -> Case:
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    s_in = groups * draw(st.integers(1, 4))
    t_out = groups * draw(st.integers(1, 4))
    kernel = _per_dim(draw, dims, st.integers(1, 4))
    dilation = _per_dim(draw, dims, st.integers(1, 2))
    padding: Any = draw(st.one_of(st.just("same"), st.just("valid"), st.integers(0, 2),
                                  st.tuples(*[st.integers(0, 2)] * dims)))
    stride = 1 if padding == "same" else _per_dim(draw, dims, st.integers(1, 3))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    dtype = draw(dtypes)
    k = (kernel,) * dims if isinstance(kernel, int) else kernel
    d = (dilation,) * dims if isinstance(dilation, int) else dilation
    size = tuple(d[i] * (k[i] - 1) + 1 + draw(st.integers(0, 4)) for i in range(dims))
    batch = draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    try:
        layer = CONV[dims](s_in, t_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           bias=bias, padding_mode=mode).to(dtype).eval()
        x = torch.randn(batch, s_in, *size, dtype=dtype)
        layout = draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "unbatched"]))
        if layout == "unbatched":  # (C, *spatial): torch's convs take it
            x = x[0]
        elif layout == "channels_last" and dims > 1:
            x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
        with torch.no_grad():
            layer(x)
    except (RuntimeError, ValueError, NotImplementedError):
        assume(False)  # a geometry torch itself refuses (reflect padding wider than the input, ...)
    vol = math.prod(k)
    override, kind = None, "tucker1"  # policy "paper": Tucker-1 on the first conv
    if groups != 1:
        kind = "none"  # skipped with its reason (an override would be refused: test_bad_inputs.py)
    elif draw(st.booleans()):
        override, kind = (min(s_in, t_out * vol), min(t_out, s_in * vol)), "tucker2"
    return Case(layer, x, override, kind)


@st.composite
def linear_cases(draw: Any, dtypes: st.SearchStrategy = DTYPES) -> Case:
    s_in, t_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))  # () : one unbatched vector
    dtype = draw(dtypes)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = nn.Linear(s_in, t_out, bias=draw(st.booleans())).to(dtype).eval()
    x = torch.randn(*lead, s_in, dtype=dtype)
    override, kind = None, "svd"
    if draw(st.booleans()):
        override, kind = (min(s_in, t_out), min(t_out, s_in)), "tucker2"
    return Case(layer, x, override, kind)


LAYERS = st.one_of(conv_cases(), linear_cases())


def _config(base: TuckerConfig, case: Case) -> TuckerConfig:
    return base.replace(ranks={"0": case.override}) if case.override is not None else base


def _block_params(case: Case, entry: tucker_fx.LayerPlan) -> int:
    """The parameter formulas of docs/compress.md ("What a layer becomes")."""
    w = case.layer.weight
    t, s, vol = w.shape[0], w.shape[1], math.prod(w.shape[2:])
    bias = t if case.layer.bias is not None else 0
    if entry.kind == "tucker2":
        r_s, r_t = entry.ranks
        return s * r_s + r_s * r_t * vol + r_t * t + bias
    (r,) = entry.ranks
    return s * r * vol + r * t + bias  # tucker1 (conv) and svd (linear, vol = 1)


# --- properties -------------------------------------------------------------------------------------

@settings(max_examples=3 * EXAMPLES)
@given(case=LAYERS)
def test_full_rank_reproduces_the_layer(case: Case) -> None:
    result = tucker_fx.compress(case.layer, case.x, config=_config(FULL, case))
    entry = result.plan["0"]
    assert entry.kind == case.kind, result.plan.to_markdown()
    with torch.no_grad():
        y, y_hat = case.layer(case.x), result.module(case.x)
    assert y_hat.dtype == y.dtype and y_hat.shape == y.shape
    assert error(case.layer, case.x, y, y_hat) <= TOLERANCE[case.x.dtype], result.plan.to_markdown()
    assert result.validation is not None and result.validation.rel_error == pytest.approx(rel(y, y_hat), rel=1e-6)
    assert all(p.dtype == case.x.dtype for p in result.module.parameters())


@settings(max_examples=2 * EXAMPLES)
@given(case=LAYERS)
def test_full_rank_with_default_lowering_reproduces_the_layer(case: Case) -> None:
    result = tucker_fx.compress(case.layer, case.x, config=_config(DEFAULT_LOWERING, case))
    with torch.no_grad():
        y, y_hat = case.layer(case.x), result.module(case.x)
    assert y_hat.dtype == y.dtype and y_hat.shape == y.shape
    assert error(case.layer, case.x, y, y_hat) <= TOLERANCE[case.x.dtype], result.plan.to_markdown()
    # lowering and merging never undo the compression
    assert result.after.total_params <= max(result.plan["0"].params_after, result.before.total_params)
    if not any((e.lowering or "").startswith("fft") for e in result.plan):  # FFT layers count as direct convs
        assert result.after.total_flops == oracle_flops(result.module, case.x)


@settings(max_examples=2 * EXAMPLES)
@given(case=st.one_of(conv_cases(st.just(torch.float32)), linear_cases(st.just(torch.float32))))
def test_flops_match_flop_counter_and_params_follow_the_formulas(case: Case) -> None:
    before = tucker_fx.analyze(case.layer, case.x)
    assert before.total_flops == oracle_flops(case.layer, case.x) == 2 * before.total_macs
    w = case.layer.weight
    assert before.total_params == w.numel() + (w.shape[0] if case.layer.bias is not None else 0)

    result = tucker_fx.compress(case.layer, case.x, config=_config(FULL.replace(validate=False), case))
    entry = result.plan["0"]
    assert result.after.total_flops == oracle_flops(result.module, case.x)
    assert entry.params_before == before.total_params and entry.flops_before == before.total_flops
    if entry.applied:
        assert entry.params_after == _block_params(case, entry) == result.after.total_params
        assert entry.flops_after == result.after.total_flops
    else:
        assert result.after.total_params == before.total_params


@settings(max_examples=2 * EXAMPLES)
@given(case=st.one_of(conv_cases(st.just(torch.float32)), linear_cases(st.just(torch.float32))),
       rank=st.one_of(st.just("vbmf"), st.integers(1, 6), st.floats(0.05, 1.0)),
       only_if_cheaper=st.booleans(), policy=st.sampled_from(["paper", "auto"]),
       second=st.booleans())
def test_every_skipped_layer_says_why(case: Case, rank: Any, only_if_cheaper: bool, policy: str,
                                      second: bool) -> None:
    model = nn.Sequential(case.layer)
    if second:  # a second layer of the same kind after it
        t = case.layer.weight.shape[0]
        model.append(type(case.layer)(t, 3, 1) if not isinstance(case.layer, nn.Linear) else nn.Linear(t, 3))
    model = model.to(case.x.dtype).eval()
    config = TuckerConfig(rank=rank, only_if_cheaper=only_if_cheaper, policy=policy, lowering="none",
                          validate=False, progress=False)
    result = tucker_fx.compress(model, case.x, config=config)
    assert len(result.plan) == len(model)
    for entry in result.plan:
        assert entry.applied or (entry.reason and entry.reason.strip()), result.plan.to_markdown()
        if entry.applied and only_if_cheaper:
            assert entry.macs_after < entry.macs_before and entry.params_after < entry.params_before
    if not result.plan.applied:
        assert result.plan.notes  # the plan also says so as a whole


@settings(max_examples=EXAMPLES)
@given(case=conv_cases(st.just(torch.float32)))
def test_full_rank_is_exact_at_every_layer_of_a_stack(case: Case) -> None:
    """Two layers: the second gets Tucker-2 under the paper policy; both stay exact."""
    t = case.layer.weight.shape[0]
    second = type(case.layer)(t, 4, 3, padding="same", bias=False)
    model = nn.Sequential(case.layer, nn.ReLU(), second).eval()
    result = tucker_fx.compress(model, case.x, config=FULL.replace(validate=False))
    with torch.no_grad():
        assert rel(model(case.x), result.module(case.x)) <= TOLERANCE[torch.float32]
    assert result.plan["2"].kind == "tucker2"


@settings(max_examples=EXAMPLES)
@given(case=LAYERS, rank=st.sampled_from([0.5, 1.0]))
def test_save_and_load_give_identical_outputs(case: Case, rank: float) -> None:
    result = tucker_fx.compress(case.layer, case.x, config=_config(DEFAULT_LOWERING.replace(rank=rank), case))
    fresh = copy.deepcopy(case.layer)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # other weights: the loaded ones must replace them
    with tempfile.TemporaryDirectory() as tmp:
        loaded = tucker_fx.load(tucker_fx.save(result, tmp), fresh, case.x)
    with torch.no_grad():
        assert torch.equal(loaded.module(case.x), result.module(case.x))


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def test_float16_conv(device: str) -> None:
    """float16 convs run on the CPU too (torch 2.13); the property tests above draw float16 as well."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3).half().to(device).eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float16, device=device)
    result = tucker_fx.compress(conv, x, config=FULL)
    with torch.no_grad():
        y, y_hat = conv(x), result.module(x)
    assert y_hat.dtype == torch.float16 and y_hat.device == y.device
    assert error(conv, x, y, y_hat) <= TOLERANCE[torch.float16]
