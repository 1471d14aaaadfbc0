"""Tests of the data-aware factorisations (tucker_fx.decomposition.data_aware)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx.decomposition import relative_error, truncated_svd, tucker1, tucker2
from tucker_fx.decomposition.data_aware import (
    ChannelStats,
    data_aware_svd,
    data_aware_tucker1,
    data_aware_tucker2,
    response_error,
    whitening,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# (T, S, *k) for a Linear and conv 1D / 2D / 3D
SHAPES = {"linear": (12, 7), "conv1d": (9, 6, 3), "conv2d": (10, 8, 3, 3), "conv3d": (8, 6, 3, 3, 3)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64)


def spd(n: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    """A random SPD matrix with eigenvalues decay**i (condition number decay**-(n-1))."""
    q = torch.linalg.qr(rand((n, n), seed))[0]
    return (q * decay ** torch.arange(n, dtype=torch.float64)) @ q.mT


def mixing(n: int, seed: int, decay: float) -> torch.Tensor:
    """``L`` with ``L L^T`` of eigenvalues decay**(2i): x = L z is strongly non-isotropic."""
    q = torch.linalg.qr(rand((n, n), seed))[0]
    return q * decay ** torch.arange(n, dtype=torch.float64)


def mix_channels(z: torch.Tensor, lmat: torch.Tensor) -> torch.Tensor:
    """Apply ``lmat`` to the channel dim (dim 1) of ``z`` (N, C, *spatial)."""
    return torch.einsum("ij,nj...->ni...", lmat, z)


# ------------------------------------------------------------------------- ChannelStats


LAYOUTS = [  # (batch shape without N, channel dim, C)
    ((6, 5), 1, 6),  # conv1d input (N, C, L)
    ((5, 4, 3), 1, 5),  # conv2d input (N, C, H, W)
    ((4, 3, 2, 3), 1, 4),  # conv3d input (N, C, D, H, W)
    ((3, 7), -1, 7),  # Linear input (N, L, C)
    ((7,), -1, 7),  # Linear input (N, C)
]


@pytest.mark.parametrize("rest, dim, c", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_stats_streaming_equals_one_shot(rest, dim, c, dtype) -> None:
    g = gen(1)
    batches = [(torch.randn((n, *rest), generator=g, dtype=torch.float64) + 0.3).to(dtype) for n in (3, 1, 7, 2)]
    stats = ChannelStats(c, dim=dim)
    for b in batches:
        stats.update(b)
    x = torch.cat(batches).to(torch.float64)
    cols = x.movedim(dim, 0).reshape(c, -1)
    expected = cols @ cols.mT / cols.shape[1]
    assert stats.count == cols.shape[1]
    got = stats.second_moment()
    assert got.dtype == torch.float64 and got.shape == (c, c)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert torch.equal(got, got.mT)


def test_channel_stats_non_contiguous_and_dim0() -> None:
    x = rand((4, 6, 5, 5), 2)
    a, b = ChannelStats(6), ChannelStats(6)
    a.update(x)
    b.update(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a.second_moment(), b.second_moment(), rtol=1e-12, atol=0)
    c = ChannelStats(6, dim=0)
    c.update(x.transpose(0, 1))  # (C, N, H, W) seen through a transposed view
    torch.testing.assert_close(a.second_moment(), c.second_moment(), rtol=1e-12, atol=0)


def test_channel_stats_errors() -> None:
    stats = ChannelStats(4)
    with pytest.raises(ValueError, match="at least one accumulated position, got count 0"):
        stats.second_moment()
    with pytest.raises(ValueError, match=r"expected 4 channels in dim 1, got 3"):
        stats.update(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="channel dim 1 within its 1 dims"):
        stats.update(torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        stats.update(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        stats.update([[0.0] * 4])
    bad = torch.ones(2, 4)
    bad[0, 1] = math.nan
    with pytest.raises(ValueError, match="finite"):
        stats.update(bad)
    assert stats.count == 0  # the bad batch was not accumulated
    with pytest.raises(ValueError, match="channels: expected an int >= 1, got 0"):
        ChannelStats(0)
    with pytest.raises(TypeError, match="dim: expected an int"):
        ChannelStats(3, dim=1.0)


# ---------------------------------------------------------------------------- whitening


def test_whitening() -> None:
    c = spd(7, 3, decay=0.5)
    sqrt, inv_sqrt = whitening(c)
    damped = c + 1e-6 * torch.trace(c) / 7 * torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(sqrt @ sqrt, damped, rtol=0, atol=1e-13)
    torch.testing.assert_close(sqrt @ inv_sqrt, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-10)
    assert torch.equal(sqrt, sqrt.mT) and torch.equal(inv_sqrt, inv_sqrt.mT)
    exact, _ = whitening(c.float(), eps=0)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact @ exact, c.float().double(), rtol=0, atol=1e-12)
    # PSD but singular: the damping makes it invertible
    v = rand((7, 3), 4)
    s, inv = whitening(v @ v.mT)
    assert bool(torch.isfinite(inv).all())
    torch.testing.assert_close(s @ inv, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-6)


def test_whitening_errors() -> None:
    c = spd(4, 0)
    with pytest.raises(ValueError, match=r"cov: expected shape \(4, 4\), got \(4, 3\)"):
        whitening(c[:, :3])
    with pytest.raises(ValueError, match="symmetric"):
        whitening(c + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1))
    neg = c - 0.6 * torch.eye(4, dtype=torch.float64) * float(torch.linalg.eigvalsh(c).max())
    with pytest.raises(ValueError, match="positive semi-definite matrix, got eigenvalue"):
        whitening(neg)
    with pytest.raises(ValueError, match="trace > 0, got trace 0"):
        whitening(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="non-singular matrix when eps = 0"):
        whitening(torch.diag(torch.tensor([1.0, 0.0])), eps=0)
    with pytest.raises(ValueError, match="eps: expected a finite number >= 0, got -1"):
        whitening(c, eps=-1)
    with pytest.raises(ValueError, match="finite"):
        whitening(torch.full((2, 2), math.inf))
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        whitening(torch.eye(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        whitening([[1.0]])


# ------------------------------------------------------------------------- exactness


def _covs(shape: tuple[int, ...], which: str, seed: int = 10) -> dict:
    t, s = shape[:2]
    out = {}
    if which in ("in", "both"):
        out["in_cov"] = spd(s, seed, decay=0.6)
    if which in ("out", "both"):
        out["out_cov"] = spd(t, seed + 1, decay=0.6)
    return out


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("which", ["in", "out", "both"])
def test_tucker2_exact_at_full_rank(name: str, which: str) -> None:
    shape = SHAPES[name]
    w = rand(shape, 5)
    dec = data_aware_tucker2(w, (shape[1], shape[0]), **_covs(shape, which))
    assert relative_error(w, dec.reconstruct()) < 1e-10
    assert dec.core.shape == (shape[0], shape[1], *shape[2:])


@pytest.mark.parametrize("name", [n for n in SHAPES if n != "linear"])
def test_tucker1_exact_at_full_rank(name: str) -> None:
    shape = SHAPES[name]
    w = rand(shape, 6)
    dec = data_aware_tucker1(w, shape[0], out_cov=spd(shape[0], 7, decay=0.6))
    assert relative_error(w, dec.reconstruct()) < 1e-10


@pytest.mark.parametrize("shape", [(12, 7), (5, 9)])
def test_svd_exact_at_full_rank(shape: tuple[int, int]) -> None:
    w = rand(shape, 8)
    first, second = data_aware_svd(w, min(shape), in_cov=spd(shape[1], 9, decay=0.6))
    assert relative_error(w, second @ first) < 1e-10


# -------------------------------------------------------------- shapes, dtype, factors


@pytest.mark.parametrize("name", list(SHAPES))
def test_tucker2_shapes_dtype_and_factor_orthonormality(name: str) -> None:
    shape = SHAPES[name]
    t, s = shape[:2]
    w = rand(shape, 11).float()
    ranks = (max(1, s // 2), max(1, t // 2))
    ref = tucker2(w, ranks)
    covs = _covs(shape, "both", 12)
    for kw in ({"in_cov": covs["in_cov"]}, {"out_cov": covs["out_cov"]}, covs):
        dec = data_aware_tucker2(w, ranks, **kw)
        for got, want in ((dec.core, ref.core), (dec.u_s, ref.u_s), (dec.u_t, ref.u_t)):
            assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
        eye_t = torch.eye(ranks[1], dtype=torch.float64)
        torch.testing.assert_close(dec.u_t.double().mT @ dec.u_t.double(), eye_t, rtol=0, atol=1e-6)
        if "in_cov" in kw:  # u_s is orthonormal in the (damped) C inner product
            c = kw["in_cov"] + 1e-6 * torch.trace(kw["in_cov"]) / s * torch.eye(s, dtype=torch.float64)
            gram = dec.u_s.double().mT @ c @ dec.u_s.double()
            torch.testing.assert_close(gram, torch.eye(ranks[0], dtype=torch.float64), rtol=0, atol=1e-5)


def test_tucker1_and_svd_shapes_dtype() -> None:
    w = rand((10, 8, 3, 3), 13).float()
    dec, ref = data_aware_tucker1(w, 4, out_cov=spd(10, 14)), tucker1(w, 4)
    assert dec.core.shape == ref.core.shape and dec.u_t.shape == ref.u_t.shape
    assert dec.core.dtype == dec.u_t.dtype == torch.float32
    lin = rand((12, 7), 15).float()
    (a, c), (ra, rc) = data_aware_svd(lin, 3, in_cov=spd(7, 16)), truncated_svd(lin, 3)
    assert a.shape == ra.shape == (3, 7) and c.shape == rc.shape == (12, 3)
    assert a.dtype == c.dtype == torch.float32
    torch.testing.assert_close(c.double().mT @ c.double(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)


# ------------------------------------------------------- no data = the weight-only result


@pytest.mark.parametrize("name", list(SHAPES))
def test_none_covariances_are_weight_only(name: str) -> None:
    shape = SHAPES[name]
    w = rand(shape, 17)
    t, s = shape[:2]
    ranks = (max(1, s // 2), max(1, t // 3))
    for n_iter in (0, 2):
        dec, ref = data_aware_tucker2(w, ranks, n_iter=n_iter), tucker2(w, ranks, n_iter=n_iter)
        assert all(torch.equal(a, b) for a, b in ((dec.core, ref.core), (dec.u_s, ref.u_s), (dec.u_t, ref.u_t)))
    if len(shape) > 2:
        d1, r1 = data_aware_tucker1(w, 3), tucker1(w, 3)
        assert torch.equal(d1.core, r1.core) and torch.equal(d1.u_t, r1.u_t)
    else:
        assert all(torch.equal(a, b) for a, b in zip(data_aware_svd(w, 3), truncated_svd(w, 3)))


@pytest.mark.parametrize("name", list(SHAPES))
def test_identity_covariances_match_weight_only(name: str) -> None:
    shape = SHAPES[name]
    w = rand(shape, 18)
    t, s = shape[:2]
    ranks = (max(1, s // 2), max(1, t // 3))
    eye_s, eye_t = torch.eye(s, dtype=torch.float64), torch.eye(t, dtype=torch.float64)
    ref = tucker2(w, ranks).reconstruct()
    # in_cov = c I: the same HOOI on a scaled W
    for c in (1.0, 3.0):
        got = data_aware_tucker2(w, ranks, in_cov=c * eye_s).reconstruct()
        assert abs(relative_error(w, got) - relative_error(w, ref)) < 1e-12
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    # out_cov = W_(0) W_(0)^T: the HOSVD u_t, then the best u_s given it (half a HOOI sweep)
    gram_t = w.reshape(t, -1) @ w.reshape(t, -1).mT
    dec = data_aware_tucker2(w, ranks, in_cov=eye_s, out_cov=gram_t)
    hosvd = tucker2(w, ranks, n_iter=0)
    torch.testing.assert_close(dec.u_t, hosvd.u_t, rtol=0, atol=1e-10)
    err = relative_error(w, dec.reconstruct())
    assert relative_error(w, tucker2(w, ranks, n_iter=1).reconstruct()) - 1e-12 <= err
    assert err <= relative_error(w, hosvd.reconstruct()) + 1e-12
    if len(shape) > 2:
        got1 = data_aware_tucker1(w, 3, out_cov=gram_t).reconstruct()
        torch.testing.assert_close(got1, tucker1(w, 3).reconstruct(), rtol=0, atol=1e-10)
    else:
        a, c = data_aware_svd(w, 3, in_cov=eye_s)
        ra, rc = truncated_svd(w, 3)
        assert abs(relative_error(w, c @ a) - relative_error(w, rc @ ra)) < 1e-12
        torch.testing.assert_close(c, rc, rtol=0, atol=1e-10)


# ------------------------------------------------------------ the objectives, exactly


@pytest.mark.parametrize("shape", [(12, 7), (6, 10)])
def test_svd_attains_the_minimum(shape: tuple[int, int]) -> None:
    """min over rank-r W_hat of tr((W - W_hat) C (W - W_hat)^T) = trailing sv^2 of W C^{1/2}."""
    w, c = rand(shape, 19), spd(shape[1], 20, decay=0.5)
    sqrt, _ = whitening(c, eps=0)
    sv = torch.linalg.svdvals(w @ sqrt)
    total = float(torch.trace(w @ c @ w.mT))
    for r in range(1, min(shape)):
        first, second = data_aware_svd(w, r, in_cov=c, eps=0)
        got = response_error(w, second @ first, c) ** 2 * total
        assert got == pytest.approx(float((sv[r:] ** 2).sum()), rel=1e-9)
        ra, rc = truncated_svd(w, r)
        assert response_error(w, rc @ ra, c) ** 2 * total > got * (1 + 1e-6)
        # no nearby rank-r matrix does better
        g = gen(r)
        for _ in range(5):
            p = second @ first + 1e-3 * torch.randn(shape[0], r, generator=g, dtype=torch.float64) @ first
            assert response_error(w, p, c) ** 2 * total >= got


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_tucker1_attains_the_true_response_minimum(dims: int) -> None:
    """With out_cov measured on the data, E||y - y_hat||^2 over the same data = trailing eigenvalues."""
    g = gen(dims)
    t, s = 10, 5
    w = torch.randn((t, s, *(3,) * dims), generator=g, dtype=torch.float64)
    x = torch.randn((6, s, *(6,) * dims), generator=g, dtype=torch.float64).cumsum(-1)  # spatially correlated
    y = CONV[dims](x, w, padding=1)
    stats = ChannelStats(t)
    stats.update(y)
    cov = stats.second_moment()
    evals = torch.linalg.eigvalsh(cov)  # ascending
    for r in (2, 5, 9):
        err = float(((CONV[dims](x, data_aware_tucker1(w, r, out_cov=cov).reconstruct(), padding=1) - y) ** 2).sum())
        assert err / stats.count == pytest.approx(float(evals[: t - r].sum()), rel=1e-9)
        base = float(((CONV[dims](x, tucker1(w, r).reconstruct(), padding=1) - y) ** 2).sum())
        assert base >= err


@pytest.mark.parametrize("name", list(SHAPES))
def test_tucker2_given_u_t_is_the_best_input_factor(name: str) -> None:
    """With out_cov fixing u_t, ||(W - W_hat) x_s C^{1/2}||^2 = ||W~||^2 - sum top R_s eig of the
    mode-s Gram of u_t^T W~ (the closed-form minimum over u_s and core), W~ = W x_s C^{1/2}."""
    shape = SHAPES[name]
    t, s = shape[:2]
    w, c_in, c_out = rand(shape, 21), spd(s, 22, decay=0.6), spd(t, 23, decay=0.6)
    sqrt, _ = whitening(c_in)
    damped = sqrt @ sqrt
    wt = torch.einsum("ts...,sr->tr...", w, sqrt)
    total = float(torch.einsum("ts...,sr,tr...->", w, damped, w))
    for r_s, r_t in ((1, 1), (s // 2, t // 2), (s - 1, t)):
        dec = data_aware_tucker2(w, (r_s, r_t), in_cov=c_in, out_cov=c_out)
        u_t = dec.u_t
        torch.testing.assert_close(u_t.abs(), torch.linalg.eigh(c_out)[1][:, -r_t:].flip(-1).abs(), rtol=0, atol=1e-10)
        proj = torch.einsum("ta,ts...->as...", u_t, wt)
        mode_s = proj.transpose(0, 1).reshape(s, -1)
        best = float((wt ** 2).sum()) - float(torch.linalg.eigvalsh(mode_s @ mode_s.mT)[-r_s:].sum())
        got = response_error(w, dec.reconstruct(), damped) ** 2 * total
        assert got == pytest.approx(best, rel=1e-9, abs=1e-12 * total)


@pytest.mark.parametrize("name", list(SHAPES))
def test_tucker2_hooi_on_whitened_weight_never_increases(name: str) -> None:
    shape = SHAPES[name]
    t, s = shape[:2]
    w, c = rand(shape, 24), spd(s, 25, decay=0.5)
    ranks = (max(1, s // 2), max(1, t // 3))
    errs = [response_error(w, data_aware_tucker2(w, ranks, in_cov=c, n_iter=n).reconstruct(), c) for n in range(4)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("dims", [0, 1, 2, 3])
def test_response_error_predicts_the_measured_error(dims: int) -> None:
    """Exact for a Linear on its calibration data; for a conv with inputs independent across
    positions (zero mean), close to the measured error of a valid conv."""
    g = gen(30 + dims)
    t, s = 8, 6
    lmat = mixing(s, 31 + dims, 0.7)
    w = torch.randn((t, s, *(3,) * dims), generator=g, dtype=torch.float64)
    approx = tucker2(w, (2, 3)).reconstruct()
    if dims == 0:
        x = torch.randn(500, s, generator=g, dtype=torch.float64) @ lmat.mT
        stats = ChannelStats(s, dim=-1)
        stats.update(x)
        measured = float(torch.linalg.vector_norm(x @ (w - approx).mT) / torch.linalg.vector_norm(x @ w.mT))
        assert response_error(w, approx, stats.second_moment()) == pytest.approx(measured, rel=1e-10)
        return
    x = mix_channels(torch.randn((400 // 4 ** (dims - 1), s, *(10,) * dims), generator=g, dtype=torch.float64), lmat)
    y, y_hat = CONV[dims](x, w), CONV[dims](x, approx)
    measured = float(torch.linalg.vector_norm(y - y_hat) / torch.linalg.vector_norm(y))
    predicted = response_error(w, approx, lmat @ lmat.mT)
    assert predicted == pytest.approx(measured, rel=0.05)


# ------------------------------------------------ data-aware beats weight-only on the data


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_tucker2_beats_weight_only_on_non_isotropic_inputs(dims: int) -> None:
    g = gen(40 + dims)
    t, s = 24, 16
    w = torch.randn((t, s, *(3,) * dims), generator=g, dtype=torch.float64)
    lmat = mixing(s, 41 + dims, 0.6)
    spatial = (5,) * dims if dims == 3 else (8,) * dims
    conv = CONV[dims]
    x_cal = mix_channels(torch.randn((64, s, *spatial), generator=g, dtype=torch.float64), lmat)
    x_test = mix_channels(torch.randn((64, s, *spatial), generator=g, dtype=torch.float64), lmat)
    in_stats, out_stats = ChannelStats(s), ChannelStats(t)
    in_stats.update(x_cal)
    out_stats.update(conv(x_cal, w))
    y = conv(x_test, w)

    def err(dec) -> float:
        return float(((conv(x_test, dec.reconstruct()) - y) ** 2).mean())

    for ranks in ((4, 8), (6, 12), (8, 8)):
        base = err(tucker2(w, ranks))
        aware_in = err(data_aware_tucker2(w, ranks, in_cov=in_stats.second_moment()))
        aware_both = err(data_aware_tucker2(w, ranks, in_cov=in_stats.second_moment(),
                                            out_cov=out_stats.second_moment()))
        assert aware_in <= 0.8 * base, (ranks, aware_in / base)
        assert aware_both <= 0.8 * base, (ranks, aware_both / base)


def test_svd_beats_weight_only_on_non_isotropic_inputs() -> None:
    g = gen(50)
    t, s = 32, 24
    w = torch.randn(t, s, generator=g, dtype=torch.float64)
    lmat = mixing(s, 51, 0.7)
    x_cal = torch.randn(4000, s, generator=g, dtype=torch.float64) @ lmat.mT
    x_test = torch.randn(4000, s, generator=g, dtype=torch.float64) @ lmat.mT
    stats = ChannelStats(s, dim=-1)
    for chunk in x_cal.split(512):
        stats.update(chunk)
    for r in (4, 8, 12):
        a, c = truncated_svd(w, r)
        base = float(((x_test @ (w - c @ a).mT) ** 2).mean())
        a, c = data_aware_svd(w, r, in_cov=stats.second_moment())
        aware = float(((x_test @ (w - c @ a).mT) ** 2).mean())
        assert aware <= 0.8 * base, (r, aware / base)


def test_trained_cnn_middle_conv() -> None:
    """A small CNN trained on a synthetic task: its middle conv's inputs are post-ReLU (non-zero
    mean, spatially correlated). Factors from calibration statistics give a lower held-out response
    error than the weight-only ones at the same ranks."""
    torch.manual_seed(0)
    g = gen(0)
    classes = 4
    protos = 3 * F.avg_pool2d(torch.randn(classes, 3, 12, 12, generator=g), 3, 1, 1)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=g)
        return protos[labels] + 0.8 * torch.randn(n, 3, 12, 12, generator=g), labels

    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),  # the middle conv, net[2]
        nn.Conv2d(24, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(200):
        x, labels = batch(32)
        loss = F.cross_entropy(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x_test, labels_test = batch(512)
        assert float((net(x_test).argmax(1) == labels_test).float().mean()) > 0.9  # it learned the task
        w = net[2].weight.detach().double()
        in_stats, out_stats = ChannelStats(16), ChannelStats(24)
        for _ in range(4):  # calibration batches, streamed
            h = net[:2](batch(128)[0]).double()
            in_stats.update(h)
            out_stats.update(F.conv2d(h, w, padding=1))  # pre-bias response
        h_test = net[:2](x_test).double()
        y = F.conv2d(h_test, w, padding=1)

        def err(approx: torch.Tensor) -> float:
            diff = F.conv2d(h_test, approx, padding=1) - y
            return float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(y))

        c_in, c_out = in_stats.second_moment(), out_stats.second_moment()
        for ranks in ((4, 6), (6, 8), (8, 12)):
            base = err(tucker2(w, ranks).reconstruct())
            aware = err(data_aware_tucker2(w, ranks, in_cov=c_in, out_cov=c_out).reconstruct())
            assert aware < 0.9 * base, (ranks, base, aware)
        for r in (4, 8, 12):
            base = err(tucker1(w, r).reconstruct())
            aware = err(data_aware_tucker1(w, r, out_cov=c_out).reconstruct())
            assert aware < 0.9 * base, (r, base, aware)


# ---------------------------------------------------------------------------- errors


def test_factorisation_errors() -> None:
    w = rand((8, 6, 3, 3), 60)
    c6, c8 = spd(6, 61), spd(8, 62)
    with pytest.raises(ValueError, match=r"in_cov: expected shape \(6, 6\), got \(8, 8\)"):
        data_aware_tucker2(w, (2, 2), in_cov=c8)
    with pytest.raises(ValueError, match=r"out_cov: expected shape \(8, 8\), got \(6, 6\)"):
        data_aware_tucker2(w, (2, 2), out_cov=c6)
    with pytest.raises(ValueError, match=r"out_cov: expected shape \(8, 8\), got \(8,\)"):
        data_aware_tucker1(w, 2, out_cov=torch.ones(8))
    with pytest.raises(ValueError, match=r"in_cov: expected shape \(6, 6\), got \(8, 8\)"):
        data_aware_svd(w[:, :, 0, 0], 2, in_cov=c8)
    with pytest.raises(ValueError, match=r"in_cov: expected shape \(6, 6\)"):
        response_error(w, w, c8)
    neg6 = c6 - 0.5 * float(torch.linalg.eigvalsh(c6).max()) * torch.eye(6, dtype=torch.float64)
    neg8 = c8 - 0.5 * float(torch.linalg.eigvalsh(c8).max()) * torch.eye(8, dtype=torch.float64)
    for call in (
        lambda: data_aware_tucker2(w, (2, 2), in_cov=neg6),
        lambda: data_aware_tucker2(w, (2, 2), out_cov=neg8),
        lambda: data_aware_tucker1(w, 2, out_cov=neg8),
        lambda: data_aware_svd(w[:, :, 0, 0], 2, in_cov=neg6),
        lambda: response_error(w, w, neg6),
    ):
        with pytest.raises(ValueError, match="positive semi-definite"):
            call()
    asym = c6 + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="in_cov: expected a symmetric matrix"):
        data_aware_tucker2(w, (2, 2), in_cov=asym)
    with pytest.raises(TypeError, match="in_cov: expected a torch.Tensor, got ndarray"):
        data_aware_tucker2(w, (2, 2), in_cov=c6.numpy())
    # ranks
    with pytest.raises(ValueError, match=r"R_s \(input-channel rank\): expected 1 <= rank <= 6, got 7"):
        data_aware_tucker2(w, (7, 2), in_cov=c6)
    with pytest.raises(ValueError, match=r"R_t \(output-channel rank\): expected 1 <= rank <= 8, got 0"):
        data_aware_tucker2(w, (2, 0), out_cov=c8)
    with pytest.raises(TypeError, match="expected an int, got float"):
        data_aware_tucker2(w, (2.0, 2), in_cov=c6)
    with pytest.raises(ValueError, match=r"ranks: expected a pair \(R_s, R_t\), got 2"):
        data_aware_tucker2(w, 2, in_cov=c6)
    with pytest.raises(ValueError, match=r"expected 1 <= rank <= 8, got 9"):
        data_aware_tucker1(w, 9, out_cov=c8)
    with pytest.raises(ValueError, match=r"rank: expected 1 <= rank <= 6, got 7"):
        data_aware_svd(w[:, :, 0, 0], 7, in_cov=c6)
    with pytest.raises(ValueError, match="n_iter: expected an int >= 0, got -1"):
        data_aware_tucker2(w, (2, 2), in_cov=c6, n_iter=-1)
    with pytest.raises(ValueError, match="eps: expected a finite number >= 0"):
        data_aware_tucker2(w, (2, 2), in_cov=c6, eps=math.nan)
    # weights
    with pytest.raises(ValueError, match=r"weight: expected a 2-D \(out, in\) matrix, got shape \(8, 6, 3, 3\)"):
        data_aware_svd(w, 2, in_cov=c6)
    with pytest.raises(TypeError, match="floating-point tensor"):
        data_aware_tucker2(w.long(), (2, 2), in_cov=c6)
    bad = w.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        data_aware_tucker1(bad, 2, out_cov=c8)
    with pytest.raises(ValueError, match=r"approx: expected shape \(8, 6, 3, 3\), got \(8, 6, 3\)"):
        response_error(w, w[..., 0], c6)


def test_response_error_edges() -> None:
    w = rand((4, 3), 70)
    c = spd(3, 71)
    assert response_error(w, w, c) == 0.0
    assert response_error(w, torch.zeros_like(w), c) == pytest.approx(1.0, rel=1e-12)
    zero = torch.zeros(4, 3, dtype=torch.float64)
    assert response_error(zero, zero, c) == 0.0
    assert response_error(zero, w, c) == math.inf
    # PSD, singular: accepted; directions of zero variance cost nothing
    v = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    shifted = w.clone()
    shifted[:, 1:] += 1.0
    assert response_error(w, shifted, v @ v.mT) == 0.0
