"""Tests of the pure Tucker math (tucker_fx.decomposition.tucker)."""

from __future__ import annotations

import math

import pytest
import torch

from tucker_fx.decomposition import (
    Tucker1,
    Tucker2,
    relative_error,
    truncated_svd,
    tucker1,
    tucker2,
    unfold,
    vbmf_ranks,
)

# (T, S, *k) with k = (), (3,), (3, 5), (5, 11, 11), (3, 3, 3)
SHAPES = [(12, 7), (9, 5, 3), (6, 8, 3, 5), (6, 4, 5, 11, 11), (10, 6, 3, 3, 3)]


def rand(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(rand((n, r), seed))[0]


def planted(
    shape: tuple[int, ...], ranks: tuple[int, int], seed: int = 0, scale: float = 1.0
) -> torch.Tensor:
    """An exactly rank-(R_s, R_t) Tucker-2 kernel: core x_0 u_t x_1 u_s."""
    t, s, *k = shape
    r_s, r_t = ranks
    core = scale * rand((r_t, r_s, *k), seed)
    u_t, u_s = orthonormal(t, r_t, seed + 1), orthonormal(s, r_s, seed + 2)
    return Tucker2(core=core, u_s=u_s, u_t=u_t).reconstruct()


def reference_reconstruct(dec: Tucker2) -> torch.Tensor:
    """Independent einsum form of W[t,s,...] = sum core[a,b,...] u_t[t,a] u_s[s,b]."""
    return torch.einsum("ab...,ta,sb->ts...", dec.core, dec.u_t, dec.u_s)


# ----------------------------------------------------------------------------- unfold


@pytest.mark.parametrize("shape", SHAPES)
def test_unfold(shape: tuple[int, ...]) -> None:
    w = rand(shape)
    t, s = shape[:2]
    k = math.prod(shape[2:])
    u0, u1 = unfold(w, 0), unfold(w, 1)
    assert u0.shape == (t, s * k) and u1.shape == (s, t * k)
    for i in range(t):
        assert torch.equal(u0[i], w[i].flatten())
    for j in range(s):
        assert torch.equal(u1[j], w[:, j].flatten())
    with pytest.raises(ValueError, match="expected 0 or 1, got 2"):
        unfold(w, 2)


# ------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_tucker2_full_rank_is_exact(shape: tuple[int, ...], dtype: torch.dtype, tol: float):
    w = rand(shape, seed=1, dtype=dtype)
    t, s = shape[:2]
    dec = tucker2(w, (s, t))
    assert dec.core.shape == (t, s, *shape[2:])
    assert dec.u_s.shape == (s, s) and dec.u_t.shape == (t, t)
    assert relative_error(w, dec.reconstruct()) < tol
    assert relative_error(w, reference_reconstruct(dec)) < tol


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [
        ((12, 7), (3, 3)),
        ((9, 5, 3), (2, 4)),
        ((16, 8, 3, 5), (3, 5)),
        ((6, 4, 5, 11, 11), (2, 2)),
        ((32, 16, 3, 3, 3), (5, 9)),
        ((64, 32, 1, 1, 1), (4, 2)),
    ],
)
@pytest.mark.parametrize("n_iter", [0, 2])
def test_tucker2_exact_on_low_rank(
    shape: tuple[int, ...], ranks: tuple[int, int], n_iter: int
) -> None:
    w = planted(shape, ranks, seed=3)
    dec = tucker2(w, ranks, n_iter=n_iter)
    assert dec.core.shape == (ranks[1], ranks[0], *shape[2:])
    assert relative_error(w, dec.reconstruct()) < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_tucker1_full_rank_is_exact(shape: tuple[int, ...], dtype: torch.dtype, tol: float):
    w = rand(shape, seed=2, dtype=dtype)
    dec = tucker1(w, shape[0])
    assert dec.core.shape == shape and dec.u_t.shape == (shape[0], shape[0])
    assert relative_error(w, dec.reconstruct()) < tol
    manual = torch.einsum("ta,a...->t...", dec.u_t, dec.core)
    assert relative_error(w, manual) < tol


@pytest.mark.parametrize(
    ("shape", "rank"), [((12, 7), 3), ((16, 8, 3, 3), 4), ((20, 6, 3, 3, 3), 5)]
)
def test_tucker1_exact_on_low_rank(shape: tuple[int, ...], rank: int) -> None:
    t = shape[0]
    w = (rand((t, rank), 4) @ rand((rank, math.prod(shape[1:])), 5)).reshape(shape)
    dec = tucker1(w, rank)
    assert isinstance(dec, Tucker1)
    assert dec.core.shape == (rank, *shape[1:])
    assert relative_error(w, dec.reconstruct()) < 1e-10


@pytest.mark.parametrize(("out_f", "in_f"), [(10, 4), (4, 10), (7, 7), (1, 5)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_truncated_svd_full_rank_is_exact(out_f: int, in_f: int, dtype: torch.dtype, tol: float):
    w = rand((out_f, in_f), seed=6, dtype=dtype)
    r = min(out_f, in_f)
    first, second = truncated_svd(w, r)
    assert first.shape == (r, in_f) and second.shape == (out_f, r)
    assert first.dtype == second.dtype == dtype
    assert relative_error(w, second @ first) < tol


@pytest.mark.parametrize(("out_f", "in_f", "rank"), [(40, 30, 3), (30, 40, 5), (128, 84, 1)])
def test_truncated_svd_low_rank(out_f: int, in_f: int, rank: int) -> None:
    w = rand((out_f, rank), 7) @ rand((rank, in_f), 8)
    first, second = truncated_svd(w, rank)
    assert relative_error(w, second @ first) < 1e-12
    # Eckart-Young: at a lower rank the error is exactly the tail of the spectrum.
    if rank > 1:
        sv = torch.linalg.svdvals(w)
        first, second = truncated_svd(w, rank - 1)
        expected = float(sv[rank - 1] / sv.norm())
        assert relative_error(w, second @ first) == pytest.approx(expected, rel=1e-9)
    eye = torch.eye(second.shape[1], dtype=w.dtype)
    assert torch.allclose(second.T @ second, eye, atol=1e-12, rtol=0)


def test_truncated_svd_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="expected a 2-D"):
        truncated_svd(rand((4, 3, 3)), 2)
    with pytest.raises(ValueError, match=r"expected 1 <= rank <= 3, got 4"):
        truncated_svd(rand((4, 3)), 4)


# ------------------------------------------------------------------- factor properties


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("n_iter", [0, 1, 3])
def test_factors_orthonormal_and_sign_convention(shape: tuple[int, ...], n_iter: int) -> None:
    w = rand(shape, seed=9)
    t, s = shape[:2]
    ranks = (max(1, s // 2), max(1, t // 2))
    dec = tucker2(w, ranks, n_iter=n_iter)
    for u in (dec.u_s, dec.u_t):
        eye = torch.eye(u.shape[1], dtype=u.dtype)
        assert torch.allclose(u.T @ u, eye, atol=1e-12, rtol=0)
        # Largest-|.| entry of each column is positive.
        idx = u.abs().argmax(dim=0)
        assert bool((u[idx, torch.arange(u.shape[1])] > 0).all())
    t1 = tucker1(w, ranks[1])
    assert torch.allclose(t1.u_t.T @ t1.u_t, torch.eye(ranks[1], dtype=w.dtype), atol=1e-12, rtol=0)
    idx = t1.u_t.abs().argmax(dim=0)
    assert bool((t1.u_t[idx, torch.arange(ranks[1])] > 0).all())


def test_deterministic_and_sign_invariant() -> None:
    w = rand((16, 8, 3, 3), seed=10)
    a, b = tucker2(w, (3, 5)), tucker2(w.clone(), (3, 5))
    assert torch.equal(a.core, b.core) and torch.equal(a.u_s, b.u_s)
    assert torch.equal(a.u_t, b.u_t)
    # Negating the weight cannot flip the factors (sign convention); only the core flips.
    c = tucker2(-w, (3, 5))
    assert torch.allclose(c.u_s, a.u_s, atol=1e-12, rtol=0)
    assert torch.allclose(c.u_t, a.u_t, atol=1e-12, rtol=0)
    assert torch.allclose(c.core, -a.core, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(24, 12, 3, 3, 3), (20, 16, 3, 3), (30, 20)])
def test_hooi_never_worse_than_hosvd(shape: tuple[int, ...]) -> None:
    w = rand(shape, seed=11)
    t, s = shape[:2]
    ranks = (max(1, s // 3), max(1, t // 3))
    errors = [relative_error(w, tucker2(w, ranks, n_iter=n).reconstruct()) for n in range(6)]
    for before, after in zip(errors, errors[1:]):
        assert after <= before + 1e-12
    if len(shape) > 2:
        assert errors[-1] < errors[0] - 1e-9  # the sweeps do something on a generic tensor
    else:
        # a matrix: HOSVD is already the truncated SVD (Eckart-Young optimal); sweeps keep it
        first, second = truncated_svd(w, min(ranks))
        optimal = relative_error(w, second @ first)
        assert abs(errors[-1] - optimal) < 1e-9 and abs(errors[0] - optimal) < 1e-9


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_preserved(dtype: torch.dtype) -> None:
    w = rand((8, 6, 3, 3), seed=12, dtype=dtype)
    dec = tucker2(w, (6, 8))
    assert dec.core.dtype == dec.u_s.dtype == dec.u_t.dtype == dtype
    assert dec.reconstruct().dtype == dtype
    t1 = tucker1(w, 8)
    assert t1.core.dtype == t1.u_t.dtype == t1.reconstruct().dtype == dtype
    first, second = truncated_svd(w.reshape(8, -1), 8)
    assert first.dtype == second.dtype == dtype
    # Full rank: exact up to the dtype's own rounding of the factors.
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    assert relative_error(w, dec.reconstruct()) < tol
    assert relative_error(w, t1.reconstruct()) < tol
    assert relative_error(w.reshape(8, -1), second @ first) < tol


# ------------------------------------------------------------------------ vbmf_ranks


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [
        ((64, 32, 3, 3, 3), (5, 9)),
        ((128, 64, 3, 3), (7, 12)),
        ((48, 96, 3), (10, 4)),
        ((96, 64), (6, 6)),  # Linear: both unfoldings are the same matrix
        ((64, 128, 1, 1, 1), (5, 5)),  # 1x1x1: a matrix, so R_s == R_t
        ((16, 4, 5, 11, 11), (2, 2)),
    ],
)
def test_vbmf_ranks_recovers_planted(shape: tuple[int, ...], ranks: tuple[int, int]) -> None:
    signal = planted(shape, ranks, seed=13, scale=0.1)
    noise = 1e-3 * rand(shape, seed=14)
    w = (signal + noise).float()
    assert vbmf_ranks(w) == ranks
    assert vbmf_ranks(w.double()) == ranks


def test_vbmf_ranks_of_noise_is_zero() -> None:
    w = 1e-3 * rand((64, 32, 3, 3, 3), seed=15)
    assert vbmf_ranks(w) == (0, 0)


def test_vbmf_ranks_agrees_with_svd_route() -> None:
    from tucker_fx.decomposition import evbmf

    w = planted((64, 32, 3, 3, 3), (5, 9), seed=16, scale=0.1) + 1e-3 * rand((64, 32, 3, 3, 3), 17)
    assert vbmf_ranks(w) == (evbmf(unfold(w, 1)).rank, evbmf(unfold(w, 0)).rank)


def test_vbmf_ranks_wide_kernel_fewer_columns_than_rows() -> None:
    # Mode-1 unfolding of (2, 40, 1) is 40 x 2: only 2 singular values exist.
    w = planted((2, 40, 1), (1, 1), seed=18) + 1e-3 * rand((2, 40, 1), 19)
    r_s, r_t = vbmf_ranks(w)
    assert 0 <= r_s <= 2 and 0 <= r_t <= 2


# ---------------------------------------------------------------- tensorly cross-check


def test_matches_tensorly_partial_tucker() -> None:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    shape, ranks = (32, 16, 3, 3, 3), (4, 6)
    w = planted(shape, ranks, seed=20, scale=0.1) + 1e-3 * rand(shape, 21)
    backend_before = tl.get_backend()
    with tl.backend_context("pytorch"):
        (core, factors), _ = partial_tucker(
            w, rank=[ranks[1], ranks[0]], modes=[0, 1], init="svd", n_iter_max=10
        )
        approx = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    assert tl.get_backend() == backend_before
    ours = relative_error(w, tucker2(w, ranks).reconstruct())
    theirs = relative_error(w, approx)
    assert ours == pytest.approx(theirs, rel=1e-6)
    # Same subspaces (the factors themselves may differ by a rotation/sign).
    dec = tucker2(w, ranks)
    p_ours = dec.u_t @ dec.u_t.T
    p_theirs = factors[0] @ factors[0].T
    assert torch.allclose(p_ours, p_theirs, atol=1e-8)


def test_close_to_tensorly_on_generic_tensor() -> None:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    w = rand((24, 12, 3, 3), seed=22)
    with tl.backend_context("pytorch"):
        (core, factors), _ = partial_tucker(w, rank=[8, 5], modes=[0, 1], init="svd", n_iter_max=2)
        theirs = relative_error(w, tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]))
    ours = relative_error(w, tucker2(w, (5, 8), n_iter=2).reconstruct())
    assert abs(ours - theirs) < 5e-3 * theirs


@pytest.mark.parametrize("shape,ranks", [((32, 16, 3, 3, 3), (4, 6)), ((20, 12, 5), (3, 7)), ((30, 20), (5, 5))])
def test_tensorly_solver_agrees_and_leaves_backend(shape, ranks) -> None:
    tl = pytest.importorskip("tensorly")
    w = planted(shape, ranks, seed=23, scale=0.1) + 1e-3 * rand(shape, 24)
    backend_before = tl.get_backend()
    theirs = tucker2(w, ranks, solver="tensorly")
    assert tl.get_backend() == backend_before
    ours = tucker2(w, ranks)
    assert relative_error(w, theirs.reconstruct()) == pytest.approx(relative_error(w, ours.reconstruct()), rel=1e-6)
    assert torch.allclose(theirs.u_t @ theirs.u_t.T, ours.u_t @ ours.u_t.T, atol=1e-6)
    assert theirs.core.dtype == theirs.u_s.dtype == w.dtype
    full = tucker2(w, (shape[1], shape[0]), solver="tensorly")  # full rank: exact
    assert relative_error(w, full.reconstruct()) < 1e-6


def test_unknown_solver() -> None:
    with pytest.raises(ValueError, match=r"solver: expected one of \('gram', 'tensorly'\), got 'svd'"):
        tucker2(rand((6, 4, 3)), (2, 2), solver="svd")


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("ranks", "exc", "match"),
    [
        ((0, 3), ValueError, r"R_s .*expected 1 <= rank <= 6, got 0"),
        ((7, 3), ValueError, r"R_s .*expected 1 <= rank <= 6, got 7"),
        ((2, 0), ValueError, r"R_t .*expected 1 <= rank <= 10, got 0"),
        ((2, 11), ValueError, r"R_t .*expected 1 <= rank <= 10, got 11"),
        ((2,), ValueError, "expected a pair"),
        ((2, 3, 4), ValueError, "expected a pair"),
        (5, ValueError, "expected a pair"),
        ((2.0, 3), TypeError, "expected an int, got float"),
        ((True, 3), TypeError, "expected an int, got bool"),
    ],
)
def test_tucker2_bad_ranks(ranks: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tucker2(rand((10, 6, 3, 3)), ranks)  # type: ignore[arg-type]


def test_tucker1_bad_rank() -> None:
    with pytest.raises(ValueError, match=r"expected 1 <= rank <= 10, got 11"):
        tucker1(rand((10, 6, 3)), 11)
    with pytest.raises(ValueError, match=r"expected 1 <= rank <= 10, got 0"):
        tucker1(rand((10, 6, 3)), 0)


@pytest.mark.parametrize(
    ("weight", "exc", "match"),
    [
        (torch.zeros(5), ValueError, r"expected shape \(T, S, \*k\)"),
        (torch.zeros(2, 2, 2, 2, 2, 2), ValueError, r"expected shape \(T, S, \*k\)"),
        (torch.zeros(0, 3, 3), ValueError, "non-empty"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "finite"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "floating-point"),
        ([[1.0]], TypeError, "got list"),
    ],
)
def test_bad_weight(weight: object, exc: type, match: str) -> None:
    for fn in (lambda w: tucker2(w, (1, 1)), lambda w: tucker1(w, 1), vbmf_ranks):
        with pytest.raises(exc, match=match):
            fn(weight)


def test_bad_n_iter() -> None:
    with pytest.raises(ValueError, match="n_iter: expected an int >= 0, got -1"):
        tucker2(rand((4, 4)), (2, 2), n_iter=-1)


def test_relative_error() -> None:
    w = rand((5, 4), 23)
    assert relative_error(w, w) == 0.0
    assert relative_error(w, 2 * w) == pytest.approx(1.0, rel=1e-12)
    assert relative_error(w, torch.zeros_like(w)) == pytest.approx(1.0, rel=1e-12)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.zeros(3), torch.ones(3)) == math.inf
    assert relative_error(w.float(), w) < 1e-7
    with pytest.raises(ValueError, match=r"expected equal shapes, got \(5, 4\) and \(4, 5\)"):
        relative_error(w, w.T)
