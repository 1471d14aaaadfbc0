"""Exactness of the FFT convolution kernels against torch's direct convolutions."""

from __future__ import annotations

import importlib
import random

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from tucker_fx.kernels import (
    FFTConv,
    TuckerFFTConv,
    clear_fft_cache,
    fft_conv,
    fft_size,
    next_fast_len,
)
# the package re-exports the function fft_conv under the submodule's name
fft_mod = importlib.import_module("tucker_fx.kernels.fft_conv")
# the buffered CPU path's tuning constants live in the engine module
engine_mod = importlib.import_module("tucker_fx.kernels.fft.engine")

# torch's own conv warns that 'same' with an even kernel pads a copy of the input
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference(x, w, b, stride, padding, dilation, padding_mode):
    """What nn.ConvNd does: F.pad with a non-zero mode, then a conv with padding 0."""
    n = w.dim() - 2
    conv = CONV[n]
    if padding_mode == "zeros":
        return conv(x, w, b, stride, padding, dilation)
    m = CONV_CLS[n](
        w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
        dilation=dilation, bias=b is not None, padding_mode=padding_mode, device="meta",
    )
    # the module's own padding arithmetic, with differentiable functional ops
    return conv(F.pad(x, m._reversed_padding_repeated_twice, mode=padding_mode), w, b, stride, 0, dilation)


# (dims, kernel, stride, padding, dilation) -- anisotropic, even, size-1 kernels; 'same'/'valid'.
GEOMETRIES = [
    (1, (1,), 1, 0, 1),
    (1, (4,), 1, "same", 1),
    (1, (5,), 2, 3, 1),
    (1, (3,), 3, 0, 2),
    (1, (7,), 1, "valid", 1),
    (1, (2,), 1, "same", 3),
    (2, (2, 4), 1, "same", 1),
    (2, (3, 3), 2, 1, 1),
    (2, (1, 5), (1, 2), (0, 2), 1),
    (2, (2, 4), (2, 1), (1, 3), (2, 1)),
    (2, (5, 3), 1, "same", (1, 2)),
    (2, (3, 3), (3, 2), "valid", 1),
    (3, (5, 11, 11), 1, (2, 5, 5), 1),
    (3, (3, 1, 5), (1, 2, 3), (1, 0, 2), 1),
    (3, (1, 1, 1), 1, 0, 1),
    (3, (2, 3, 4), 1, "same", (2, 1, 1)),
    (3, (3, 3, 3), (2, 1, 2), 1, (1, 2, 1)),
    (3, (2, 2, 2), 1, "valid", 1),
]
SPATIAL = {1: (13,), 2: (9, 11), 3: (7, 12, 13)}
SPATIAL_BIG = {3: (7, 15, 17)}  # the 11x11 kernel needs room
MODES = ["zeros", "reflect", "replicate", "circular"]


def _cases():
    rng = random.Random(0)
    cases = []
    for gi, (n, k, s, p, d) in enumerate(GEOMETRIES):
        for mode in MODES:
            if mode != "zeros" and p in ("valid", 0):
                continue  # nothing to pad: identical to 'zeros'
            batch = rng.choice([1, 3])
            bias = rng.random() < 0.5
            c_in, c_out = rng.randint(1, 5), rng.randint(1, 5)
            cases.append(pytest.param(n, k, s, p, d, mode, batch, bias, c_in, c_out, id=f"g{gi}-{mode}-b{batch}-{'bias' if bias else 'nobias'}-{c_in}x{c_out}"))
    return cases


CASES = _cases()


def _inputs(n, k, d, batch, c_in, c_out, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    spatial = SPATIAL_BIG.get(n, SPATIAL[n]) if max(k) > 5 else SPATIAL[n]
    x = torch.randn(batch, c_in, *spatial, generator=g, dtype=dtype)
    w = torch.randn(c_out, c_in, *k, generator=g, dtype=dtype)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n,k,s,p,d,mode,batch,bias,c_in,c_out", CASES)
def test_fft_conv_matches_conv(n, k, s, p, d, mode, batch, bias, c_in, c_out, dtype):
    x, w, b = _inputs(n, k, d, batch, c_in, c_out, bias, dtype, seed=len(k) * 100 + c_in * 10 + c_out)
    ref = reference(x, w, b, s, p, d, mode)
    out = fft_conv(x, w, b, s, p, d, mode)
    assert out.shape == ref.shape
    assert out.dtype == dtype
    assert out.is_contiguous()
    assert rel_err(out, ref) < TOL[dtype]


def test_case_grid_size():
    assert 50 <= len(CASES) <= 100  # x2 dtypes -> 100-200 tests


@pytest.mark.parametrize("n", [1, 2, 3])
def test_unbatched_input(n):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *SPATIAL[n], generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, *([3] * n), generator=g, dtype=torch.float64)
    assert rel_err(fft_conv(x, w, padding=1), CONV[n](x, w, padding=1)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 9, 11, generator=g)
    w = torch.randn(3, 2, 3, 5, generator=g)
    out = fft_conv(x.to(dtype), w.to(dtype), padding=1)
    assert out.dtype == dtype
    ref = F.conv2d(x.to(dtype).float(), w.to(dtype).float(), padding=1)
    assert rel_err(out.float(), ref) < 1e-2


def test_large_padding_and_stride_edge():
    # kept outputs that only see padding; stride larger than the input
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    w = torch.randn(2, 3, 2, dtype=torch.float64)
    b = torch.randn(2, dtype=torch.float64)
    for s, p in [(1, 7), (5, 6), (9, 3)]:
        ref = F.conv1d(x, w, b, s, p)
        assert rel_err(fft_conv(x, w, b, s, p), ref) < 1e-12


def test_bad_arguments():
    x = torch.randn(1, 2, 10)
    w = torch.randn(3, 2, 3)
    with pytest.raises(ValueError, match="strided"):
        fft_conv(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        fft_conv(x, w, padding=1, padding_mode="mirror")
    with pytest.raises(ValueError, match="expected input"):
        fft_conv(torch.randn(1, 3, 10), w)
    with pytest.raises(ValueError, match="larger than the padded"):
        fft_conv(torch.randn(1, 2, 2), w)
    with pytest.raises(ValueError, match="padding must"):
        fft_conv(x, w, padding="full")
    with pytest.raises(TypeError, match="floating-point"):
        fft_conv(x.long(), w.long())


def test_fft_size_and_next_fast_len():
    assert next_fast_len(125) == 125 and next_fast_len(125, even=True) == 126
    assert next_fast_len(11) == 12 and next_fast_len(1) == 1
    # zero padding is folded into the spectrum: needs size + max(left, right), not + both
    assert fft_size((28, 120, 160), (5, 11, 11), padding=(2, 5, 5)) == (30, 125, 168)
    assert fft_size((28, 120, 160), (5, 11, 11), padding=(2, 5, 5), padding_mode="reflect") == (
        next_fast_len(32), next_fast_len(130), next_fast_len(170, even=True))
    for size in range(2, 400):
        m = next_fast_len(size)
        assert m >= size
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        assert m == 1


# ------------------------------------------------------------------------------- TuckerFFTConv


def tucker_reference(x, first, core, last, bias, stride, padding, dilation, padding_mode):
    n = core.dim() - 2
    conv = CONV[n]
    one = (1,) * n
    y = x if first is None else conv(x, first.reshape(*first.shape, *one))
    y = reference(y, core, None if last is not None else bias, stride, padding, dilation, padding_mode)
    if last is not None:
        y = conv(y, last.reshape(*last.shape, *one), bias)
    return y


TUCKER_CASES = [
    # n, S, R_s, R_t, T, kernel, stride, padding, dilation, mode, batch, bias, tucker1
    (3, 4, 2, 2, 6, (5, 11, 11), 1, (2, 5, 5), 1, "zeros", 1, True, False),
    (3, 4, 2, 3, 6, (3, 5, 5), 1, 0, 1, "zeros", 2, True, False),
    (3, 5, 3, 2, 4, (3, 1, 5), (1, 2, 3), (1, 0, 2), (2, 1, 1), "zeros", 3, False, False),
    (3, 4, 2, 2, 3, (3, 3, 3), 1, 1, 1, "reflect", 2, True, False),
    (2, 6, 3, 2, 5, (2, 4), 1, "same", 1, "replicate", 1, True, False),
    (2, 3, 2, 3, 4, (3, 3), 2, 1, 1, "circular", 3, True, False),
    (1, 5, 2, 2, 7, (4,), 1, "same", 2, "zeros", 2, True, False),
    (3, 4, 4, 2, 6, (5, 11, 11), 1, (2, 5, 5), 1, "zeros", 1, True, True),  # Tucker-1
    (2, 3, 3, 2, 4, (3, 5), (2, 1), "valid", 1, "zeros", 2, False, True),  # Tucker-1
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mix_last", [False, True], ids=["mix-spatial", "mix-freq"])
@pytest.mark.parametrize("case", TUCKER_CASES, ids=lambda c: f"{c[0]}d-{c[9]}-k{c[5]}-t1{c[12]}")
def test_tucker_fft_conv_matches_three_convs(case, mix_last, dtype):
    n, S, r_s, r_t, T, k, s, p, d, mode, batch, bias, tucker1 = case
    g = torch.Generator().manual_seed(7)
    spatial = (8, 16, 18)[-n:] if max(k) > 5 else (7, 10, 11)[-n:]
    x = torch.randn(batch, S, *spatial, generator=g, dtype=dtype)
    first = None if tucker1 else torch.randn(r_s, S, generator=g, dtype=dtype)
    core = torch.randn(r_t, S if tucker1 else r_s, *k, generator=g, dtype=dtype)
    last = torch.randn(T, r_t, generator=g, dtype=dtype)
    b = torch.randn(T, generator=g, dtype=dtype) if bias else None
    m = TuckerFFTConv(first, core, last, b, s, p, d, mode, mix_last_in_frequency=mix_last)
    ref = tucker_reference(x, first, core, last, b, s, p, d, mode)
    with torch.no_grad():
        out = m(x)
        out2 = m(x)  # from the cached spectrum
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out, out2)


@pytest.mark.parametrize("first_none,last_none", [(False, True), (True, True)])
def test_tucker_fft_conv_without_last(first_none, last_none):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64, generator=g)
    first = None if first_none else torch.randn(3, 4, dtype=torch.float64, generator=g)
    core = torch.randn(2, 4 if first_none else 3, 3, 5, dtype=torch.float64, generator=g)
    b = torch.randn(2, dtype=torch.float64, generator=g)
    m = TuckerFFTConv(first, core, None, b, padding=(1, 2))
    ref = tucker_reference(x, first, core, None, b, 1, (1, 2), 1, "zeros")
    assert rel_err(m(x), ref) < 1e-10


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_channel_mix_commutes_with_padding(mode):
    # The reason TuckerFFTConv may pad after the first mix.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 6, 7, 8, dtype=torch.float64, generator=g)
    m = torch.randn(3, 4, 1, 1, 1, dtype=torch.float64, generator=g)
    pad = (2, 1, 0, 3, 1, 2)
    a = F.pad(F.conv3d(x, m), pad, mode=mode)
    b = F.conv3d(F.pad(x, pad, mode=mode), m)
    assert rel_err(a, b) < 1e-14


def test_tucker_accepts_conv_shaped_factors_and_checks_shapes():
    core = torch.randn(2, 3, 3, 3)
    m = TuckerFFTConv(torch.randn(3, 5, 1, 1), core, torch.randn(4, 2, 1, 1))
    assert m.first.shape == (3, 5) and m.last.shape == (4, 2)
    assert m.in_channels == 5 and m.out_channels == 4
    assert "5 -> 3 -> 2 -> 4" in repr(m)
    with pytest.raises(ValueError, match="first must be"):
        TuckerFFTConv(torch.randn(2, 5), core, None)
    with pytest.raises(ValueError, match="last must be"):
        TuckerFFTConv(None, core, torch.randn(4, 3))
    with pytest.raises(ValueError, match="bias"):
        TuckerFFTConv(None, core, torch.randn(4, 2), torch.randn(3))
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(1, 4, 8, 8))


# ------------------------------------------------------------------------------------- FFTConv


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 5, stride=2, padding=2, padding_mode="reflect"),
        nn.Conv2d(2, 3, (2, 4), padding="same", dilation=(2, 1), bias=False),
        nn.Conv3d(2, 2, (5, 11, 11), padding=(2, 5, 5)),
        nn.Conv3d(3, 2, (3, 1, 5), stride=(1, 2, 3), padding=(1, 0, 2), padding_mode="circular"),
    ],
    ids=["1d-reflect", "2d-same", "3d-c1core", "3d-circular"],
)
def test_from_conv_matches_conv(conv):
    torch.manual_seed(3)
    conv = conv.double()
    m = FFTConv.from_conv(conv)
    x = torch.randn(2, conv.in_channels, *(9, 16, 17)[-(conv.weight.dim() - 2):], dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(m(x), conv(x)) < 1e-10
    assert rel_err(m(x), conv(x)) < 1e-10  # grad-enabled path (cache + custom backward)
    assert "kernel_size" in repr(m)


def test_from_conv_rejects_groups():
    with pytest.raises(ValueError, match="groups"):
        FFTConv.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError):
        FFTConv.from_conv(nn.Linear(3, 3))


def _entries(p):
    return fft_mod._SPECTRUM_CACHE.get(p, {})


def test_cache_hit_and_invalidation_on_inplace_update():
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 5, padding=2).double()
    m = FFTConv.from_conv(conv).eval()
    x = torch.randn(1, 2, 12, 13, dtype=torch.float64)
    with torch.no_grad():
        y1 = m(x)
        (stamp, spec), = _entries(m.weight).values()
        y2 = m(x)
        (stamp2, spec2), = _entries(m.weight).values()
        assert spec2 is spec and torch.equal(y1, y2)  # cache hit
        m.weight.mul_(2)
        y3 = m(x)
    (stamp3, spec3), = _entries(m.weight).values()
    assert spec3 is not spec and stamp3 != stamp
    ref = F.conv2d(x, 2 * conv.weight, conv.bias, padding=2)
    assert rel_err(y3, ref) < 1e-10
    # replacing the tensor behind the Parameter (module.to, .data =) changes data_ptr
    m.weight.data = m.weight.data * 0.5
    with torch.no_grad():
        assert rel_err(m(x), conv(x)) < 1e-10
    # a new input shape gets its own entry
    with torch.no_grad():
        m(torch.randn(1, 2, 10, 10, dtype=torch.float64))
    assert len(_entries(m.weight)) == 2
    clear_fft_cache(m)
    assert len(_entries(m.weight)) == 0


def test_cache_invalidated_by_optimizer_step_and_load_state_dict():
    torch.manual_seed(5)
    first, core, last = torch.randn(2, 3), torch.randn(2, 2, 3, 3), torch.randn(4, 2)
    m = TuckerFFTConv(first, core, last, torch.randn(4), padding=1, mix_last_in_frequency=True)
    x = torch.randn(2, 3, 8, 9)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        ref = tucker_reference(x, m.first, m.core, m.last, m.bias, 1, 1, 1, "zeros")
        assert rel_err(m(x), ref) < 1e-5
    state = {k: v * 3 for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    with torch.no_grad():
        ref = tucker_reference(x, m.first, m.core, m.last, m.bias, 1, 1, 1, "zeros")
        assert rel_err(m(x), ref) < 1e-5  # last is part of the cached matrix here


@pytest.mark.parametrize("warm_cache", [False, True], ids=["cold", "cached"])
def test_gradients_match_conv(warm_cache):
    torch.manual_seed(6)
    conv = nn.Conv3d(2, 3, (3, 5, 4), stride=(1, 2, 1), padding=(1, 2, 1), dilation=(1, 1, 2)).double()
    m = FFTConv.from_conv(conv).eval()
    x = torch.randn(2, 2, 6, 11, 12, dtype=torch.float64)
    if warm_cache:
        with torch.no_grad():
            m(x)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    g = torch.randn_like(conv(x))
    conv(x1).backward(g)
    m(x2).backward(g)
    assert rel_err(x2.grad, x1.grad) < 1e-10
    assert rel_err(m.weight.grad, conv.weight.grad) < 1e-10
    assert rel_err(m.bias.grad, conv.bias.grad) < 1e-10


def test_tucker_gradients_match_reference():
    torch.manual_seed(7)
    d = torch.float64
    params = [torch.randn(2, 4, dtype=d), torch.randn(3, 2, 3, 5, dtype=d), torch.randn(5, 3, dtype=d), torch.randn(5, dtype=d)]
    x = torch.randn(2, 4, 9, 10, dtype=d)
    for mix_last in (False, True):
        m = TuckerFFTConv(*params, padding=(1, 2), padding_mode="reflect", mix_last_in_frequency=mix_last)
        ref_params = [p.clone().requires_grad_() for p in params]
        ref = tucker_reference(x, *ref_params, 1, (1, 2), 1, "reflect")
        g = torch.randn_like(ref)
        ref.backward(g)
        for _ in range(2):  # second time through the cached spectrum
            m.zero_grad()
            m(x).backward(g)
            for p, r in zip([m.first, m.core, m.last, m.bias], ref_params):
                assert rel_err(p.grad, r.grad) < 1e-10


@pytest.mark.slow  # float64 gradcheck, over 10 s
def test_gradcheck_tiny():
    torch.manual_seed(8)
    d = torch.float64
    x = torch.randn(1, 2, 5, 6, dtype=d, requires_grad=True)
    w = torch.randn(2, 2, 2, 3, dtype=d, requires_grad=True)
    b = torch.randn(2, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fft_conv(x, w, b, stride=(1, 2), padding=(1, 1), dilation=(2, 1)), (x, w, b)
    )
    first = torch.randn(2, 3, dtype=d, requires_grad=True)
    core = torch.randn(2, 2, 3, dtype=d, requires_grad=True)
    last = torch.randn(3, 2, dtype=d, requires_grad=True)
    x1 = torch.randn(2, 3, 7, dtype=d, requires_grad=True)
    for mix_last in (False, True):
        def f(x1, first, core, last):
            return fft_mod._fft_block(x1, first, core, last, None, 1, "same", 1, "circular", mix_last, False)
        assert torch.autograd.gradcheck(f, (x1, first, core, last))


# ------------------------------------------------------------------------------------------ FX


def test_symbolic_trace_of_model_with_tucker_fft_conv():
    torch.manual_seed(9)
    model = nn.Sequential(
        TuckerFFTConv(torch.randn(2, 4), torch.randn(2, 2, 3, 5, 5), torch.randn(6, 2), torch.randn(6), padding=(1, 2, 2)),
        nn.ReLU(),
        FFTConv(torch.randn(3, 6, 1, 3, 3), padding="same"),
    ).eval()
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(t is fft_mod._fft_block_cached for t in targets) == 2
    x = torch.randn(2, 4, 6, 10, 11)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(x)
    out_node = [n for n in gm.graph.nodes if n.op == "output"][0]
    assert tuple(out_node.args[0].meta["tensor_meta"].shape) == (2, 3, 6, 10, 11)


# ------------------------------------------------------------------ buffered (no-autograd) path

BUFFERED_CASES = [
    # n, S, R_s, R_t, T, kernel, stride, padding, dilation, mode, tucker1, mix_last, last_none
    (3, 4, 2, 2, 6, (5, 11, 11), 1, (2, 5, 5), 1, "zeros", False, False, False),
    (3, 4, 2, 2, 6, (5, 11, 11), 1, (2, 5, 5), 1, "zeros", False, True, False),
    (3, 5, 3, 2, 4, (3, 1, 5), (1, 2, 3), (1, 0, 2), (2, 1, 1), "zeros", False, False, False),
    (2, 3, 2, 3, 4, (3, 3), (3, 2), (4, 1), 1, "zeros", False, False, False),  # crops input
    (3, 4, 2, 2, 3, (3, 3, 3), 1, 1, 1, "reflect", False, False, False),
    (2, 6, 3, 2, 5, (2, 4), 1, "same", 1, "circular", False, True, False),
    (1, 5, 2, 2, 7, (4,), 2, 3, 2, "replicate", False, False, False),
    (2, 3, 3, 2, 4, (3, 5), (2, 1), "valid", 1, "zeros", True, False, False),  # Tucker-1
    (2, 3, 2, 4, 4, (3, 3), 1, 1, 1, "zeros", False, False, True),  # no last
    (2, 9, 8, 9, 5, (3, 3), 1, 1, 1, "zeros", False, False, False),  # more channels
]


@pytest.mark.parametrize("loop_mix", [False, True], ids=["conv-mix", "loop-mix"])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "per-sample"])
@pytest.mark.parametrize("case", BUFFERED_CASES, ids=lambda c: f"{c[0]}d-{c[9]}-k{c[5]}-s{c[6]}")
def test_buffered_path_matches_autograd_path(case, chunk_bytes, loop_mix, monkeypatch):
    n, S, r_s, r_t, T, k, s, p, d, mode, tucker1, mix_last, last_none = case
    monkeypatch.setattr(engine_mod, "_BUFFER_MIN_BYTES", 0)  # small tensors take it too
    if chunk_bytes is not None:
        monkeypatch.setattr(engine_mod, "_CHUNK_BYTES", chunk_bytes)
    if loop_mix:
        monkeypatch.setattr(engine_mod, "_LOOP_MIX_MIN_NUMEL", 0)
    g = torch.Generator().manual_seed(11)
    dt = torch.float64
    spatial = (8, 16, 18)[-n:] if max(k) > 5 else (7, 10, 11)[-n:]
    x = torch.randn(3, S, *spatial, generator=g, dtype=dt)
    first = None if tucker1 else torch.randn(r_s, S, generator=g, dtype=dt)
    core = torch.randn(r_t, S if tucker1 else r_s, *k, generator=g, dtype=dt)
    last = None if last_none else torch.randn(T, r_t, generator=g, dtype=dt)
    b = torch.randn(r_t if last_none else T, generator=g, dtype=dt)
    m = TuckerFFTConv(first, core, last, b, s, p, d, mode, mix_last_in_frequency=mix_last)
    ref = tucker_reference(x, first, core, last, b, s, p, d, mode)
    with torch.no_grad():
        fast = [m(x), m(x)]  # buffers made, then reused
    slow = m(x)  # autograd path
    assert slow.requires_grad and not fast[0].requires_grad
    for out in fast + [slow]:
        assert out.shape == ref.shape and out.is_contiguous()
        assert rel_err(out, ref) < 1e-10
    assert fast[0].data_ptr() != fast[1].data_ptr()  # outputs never alias the buffers
    assert fft_mod._WORKSPACES.get(m.core) is not None
    clear_fft_cache(m)
    assert fft_mod._WORKSPACES.get(m.core) is None


def test_reuse_buffers_off_and_inference_mode(monkeypatch):
    monkeypatch.setattr(engine_mod, "_BUFFER_MIN_BYTES", 0)
    torch.manual_seed(12)
    conv = nn.Conv3d(3, 2, (3, 5, 5), padding=(1, 2, 2)).double()
    x = torch.randn(2, 3, 6, 9, 10, dtype=torch.float64)
    ref = conv(x)
    for reuse in (False, True):
        m = FFTConv.from_conv(conv)
        m.reuse_buffers = reuse
        with torch.inference_mode():
            a = m(x)
        with torch.no_grad():
            b = m(x)
        c = m(x)  # grad mode after inference mode: no inference tensors leak into autograd
        c.sum().backward()
        for out in (a, b, c):
            assert rel_err(out, ref) < 1e-10
    assert fft_mod._WORKSPACES.get(m.weight) is not None  # the reuse=True module made buffers


def test_low_precision_module_uses_cache():
    torch.manual_seed(13)
    m = FFTConv(torch.randn(2, 2, 3, 5), torch.randn(2), padding=1).half()
    x = torch.randn(1, 2, 9, 12).half()
    with torch.no_grad():
        y1 = m(x)
        (_, spec), = _entries(m.weight).values()
        y2 = m(x)
        (_, spec2), = _entries(m.weight).values()
    assert spec2 is spec and spec.dtype == torch.complex64
    assert y1.dtype == torch.float16 and torch.equal(y1, y2)
    ref = F.conv2d(x.float(), m.weight.float(), m.bias.float(), padding=1)
    assert rel_err(y1.float(), ref) < 1e-2


@pytest.mark.parametrize("c_in,c_out", [(8, 9), (16, 3)])
def test_more_channels(c_in, c_out):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, c_in, 9, 10, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, 3, 4, generator=g, dtype=torch.float64)
    assert rel_err(fft_conv(x, w, padding="same"), F.conv2d(x, w, padding="same")) < 1e-10


def test_default_thresholds_buffer_large_inputs_only():
    torch.manual_seed(15)
    conv = nn.Conv3d(2, 2, 3, padding=1)
    m = FFTConv.from_conv(conv)
    with torch.no_grad():
        small = torch.randn(1, 2, 6, 8, 8)
        assert rel_err(m(small), conv(small)) < 1e-5
        assert fft_mod._WORKSPACES.get(m.weight) is None
        big = torch.randn(1, 2, 40, 64, 64)  # > 1 MiB of FFT work
        assert rel_err(m(big), conv(big)) < 1e-5
        assert fft_mod._WORKSPACES.get(m.weight) is not None


def test_shape_prop_under_fake_tensors_and_meta(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    monkeypatch.setattr(engine_mod, "_BUFFER_MIN_BYTES", 0)  # fake tensors must not take it
    torch.manual_seed(16)
    model = nn.Sequential(
        TuckerFFTConv(torch.randn(2, 4), torch.randn(2, 2, 3, 5, 5), torch.randn(6, 2), torch.randn(6), padding=(1, 2, 2)),
        nn.ReLU(),
    ).eval()
    gm = torch.fx.symbolic_trace(model)
    mode = FakeTensorMode()
    with torch.no_grad():
        ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(torch.randn(2, 4, 6, 10, 11)))
    shapes = [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta]
    assert shapes[-1] == (2, 6, 6, 10, 11)
    assert len(_entries(model[0].core)) == 0  # nothing cached from fake tensors
    meta = torch.fx.symbolic_trace(model).to("meta")
    with torch.no_grad():
        assert meta(torch.empty(2, 4, 6, 10, 11, device="meta")).shape == (2, 6, 6, 10, 11)
