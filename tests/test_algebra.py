"""Factor algebra (tucker_fx.decomposition.algebra): each merged map against the modules it replaces.

Exactness in float64 (the merges are exact in exact arithmetic), over dims 1-3, stride, padding,
dilation, padding modes and bias / no bias.
"""

import itertools

import pytest
import torch
from torch import nn

from tucker_fx.decomposition.algebra import (
    absorb_into_conv,
    as_matrix,
    compose_linear,
    fold_into_flat_linear,
)

# torch's own conv warns that 'same' with an even kernel pads a copy of the input
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

DT = torch.float64
TOL = 1e-12
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (13,), 2: (9, 11), 3: (5, 7, 6)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _pointwise(d: int, c_in: int, c_out: int, bias: bool) -> nn.Module:
    return CONV[d](c_in, c_out, 1, bias=bias).to(DT)


# --- absorb_into_conv: 1x1 (no bias) -> conv == one conv ----------------------------------------

ABSORB_CASES = [
    # (dims, kernel, stride, padding, dilation, padding_mode)
    *[(d, 3, 1, 0, 1, "zeros") for d in (1, 2, 3)],
    *[(d, 3, 2, 1, 1, "zeros") for d in (1, 2, 3)],
    *[(d, 3, 1, 2, 2, "zeros") for d in (1, 2, 3)],
    *[(d, 2, 1, "same", 1, "zeros") for d in (1, 2, 3)],
    *[(d, 3, 1, 1, 1, mode) for d in (1, 2, 3) for mode in ("reflect", "replicate", "circular")],
    (2, (3, 5), (2, 1), (1, 2), (1, 2), "zeros"),
    (3, (1, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2, 1), "zeros"),
]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("case", ABSORB_CASES, ids=lambda c: f"{c[0]}d-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}-{c[5]}")
def test_absorb_into_conv_equals_the_two_convs(case, bias):
    d, k, s, p, dil, mode = case
    S, R, T = 5, 3, 4
    first = _pointwise(d, S, R, bias=False)
    core = CONV[d](R, T, k, stride=s, padding=p, dilation=dil, padding_mode=mode, bias=bias).to(DT)
    x = torch.randn(2, S, *SPATIAL[d], dtype=DT)
    with torch.no_grad():
        ref = core(first(x))
        w = absorb_into_conv(core.weight, as_matrix(first.weight))
        merged = CONV[d](S, T, k, stride=s, padding=p, dilation=dil, padding_mode=mode, bias=bias).to(DT)
        merged.weight.copy_(w)
        if bias:
            merged.bias.copy_(core.bias)
        out = merged(x)
    assert tuple(w.shape) == (T, S, *merged.kernel_size)
    assert rel_err(out, ref) < TOL


def test_absorb_into_conv_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected a conv weight \(T, R=3, \*k\) after the mix \(3, 5\), got \(4, 2, 3\)"):
        absorb_into_conv(torch.randn(4, 2, 3), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"mix must be a matrix \(out, in\), got shape \(3, 5, 1\)"):
        absorb_into_conv(torch.randn(4, 3, 3), torch.randn(3, 5, 1))


# --- compose_linear: two affine maps == one --------------------------------------------------------

@pytest.mark.parametrize("bias_a,bias_b", list(itertools.product([False, True], repeat=2)))
def test_compose_linear_equals_two_linears(bias_a, bias_b):
    a, b = nn.Linear(7, 3, bias=bias_a).to(DT), nn.Linear(3, 5, bias=bias_b).to(DT)
    x = torch.randn(4, 7, dtype=DT)
    with torch.no_grad():
        w, bias = compose_linear(a.weight, a.bias, b.weight, b.bias)
        out = x @ w.T + (bias if bias is not None else 0)
        ref = b(a(x))
    assert (bias is None) == (not bias_a and not bias_b)
    assert tuple(w.shape) == (5, 7)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("bias_a,bias_b", list(itertools.product([False, True], repeat=2)))
def test_compose_linear_merges_pointwise_convs(d, bias_a, bias_b):
    a, b = _pointwise(d, 6, 2, bias_a), _pointwise(d, 2, 4, bias_b)
    x = torch.randn(2, 6, *SPATIAL[d], dtype=DT)
    with torch.no_grad():
        w, bias = compose_linear(as_matrix(a.weight), a.bias, as_matrix(b.weight), b.bias)
        merged = _pointwise(d, 6, 4, bias is not None)
        merged.weight.copy_(w.reshape(merged.weight.shape))
        if bias is not None:
            merged.bias.copy_(bias)
        assert rel_err(merged(x), b(a(x))) < TOL


def test_compose_linear_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"w_b \(5, 4\) does not follow w_a \(3, 7\): expected w_b.shape\[1\] == 3"):
        compose_linear(torch.randn(3, 7), None, torch.randn(5, 4), None)
    with pytest.raises(ValueError, match=r"b_a must have shape \(3,\), got \(4,\)"):
        compose_linear(torch.randn(3, 7), torch.randn(4), torch.randn(5, 3), None)


# --- fold_into_flat_linear: 1x1 -> flatten -> Linear == flatten -> Linear --------------------------

@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("bias_mix,bias_lin", list(itertools.product([False, True], repeat=2)))
def test_fold_into_flat_linear_equals_mix_flatten_linear(d, bias_mix, bias_lin):
    S, C, T = 4, 3, 6
    mix = _pointwise(d, S, C, bias_mix)
    positions = int(torch.tensor(SPATIAL[d]).prod())
    lin = nn.Linear(C * positions, T, bias=bias_lin).to(DT)
    x = torch.randn(2, S, *SPATIAL[d], dtype=DT)
    with torch.no_grad():
        ref = lin(torch.flatten(mix(x), 1))
        w, bias = fold_into_flat_linear(lin.weight, lin.bias, as_matrix(mix.weight), mix.bias)
        out = torch.flatten(x, 1) @ w.T + (bias if bias is not None else 0)
    assert tuple(w.shape) == (T, S * positions)
    assert (bias is None) == (not bias_mix and not bias_lin)
    assert rel_err(out, ref) < TOL


def test_fold_into_flat_linear_refuses_a_linear_of_another_width():
    with pytest.raises(ValueError, match=r"does not read a flattened 3-channel map: expected in_features a multiple of 3"):
        fold_into_flat_linear(torch.randn(6, 10), None, torch.randn(3, 4), None)


# --- as_matrix --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 1), (4, 3, 1, 1), (4, 3, 1, 1, 1)])
def test_as_matrix_is_a_view(shape):
    w = torch.randn(*shape)
    m = as_matrix(w)
    assert tuple(m.shape) == (4, 3) and m.data_ptr() == w.data_ptr()


def test_as_matrix_refuses_a_spatial_kernel():
    with pytest.raises(ValueError, match=r"pointwise conv weight \(out, in, 1, \.\.\.\), got shape \(4, 3, 3, 3\)"):
        as_matrix(torch.randn(4, 3, 3, 3))


# --- the passes use it: the merged weights are the algebra's, bit for bit ------------------------

def test_merge_linear_uses_the_algebra():
    from tucker_fx.analysis import propagate_shapes
    from tucker_fx.passes.merge_linear import MergeLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 4)).eval()
    a, b = model[0], model[1]
    gm = torch.fx.symbolic_trace(model)
    propagate_shapes(gm, (torch.randn(2, 8),))
    assert MergeLinear()(gm).modified
    merged = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert len(merged) == 1
    with torch.no_grad():
        w, bias = compose_linear(a.weight, a.bias, b.weight, b.bias)
    assert torch.equal(merged[0].weight, w) and torch.equal(merged[0].bias, bias)
