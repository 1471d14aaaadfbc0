"""Tests of analytic empirical VBMF rank selection (tucker_fx.decomposition.evbmf)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tucker_fx.decomposition import VBMFResult, evbmf, evbmf_from_singular_values
from tucker_fx.decomposition import linalg

NOISE = 1e-3  # conv-weight scale noise


def low_rank_plus_noise(
    L: int, M: int, rank: int, *, sigma: float = NOISE, seed: int = 0, factor: float = 3.0
) -> torch.Tensor:
    """``U diag(s) V^T + sigma * N(0, 1)`` with ``s`` from ``factor`` to ``2 * factor`` times
    the noise edge ``sigma * (sqrt(L) + sqrt(M))``: clearly detectable signal."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(L, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(M, rank, generator=g, dtype=torch.float64))[0]
    edge = sigma * (math.sqrt(L) + math.sqrt(M))
    s = edge * torch.linspace(2 * factor, factor, rank, dtype=torch.float64)
    noise = sigma * torch.randn(L, M, generator=g, dtype=torch.float64)
    return (u * s) @ v.T + noise


def omega_reference(sigma2: np.ndarray, s: np.ndarray, L: int, M: int) -> np.ndarray:
    """Omega(sigma2) of DESIGN section 3 (L <= M, all L singular values, no residual),
    written independently of the package, vectorised over sigma2."""
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    out = []
    for s2 in np.atleast_1d(sigma2):
        x = s**2 / (M * s2)
        lo, hi = x[x <= x_bar], x[x > x_bar]
        tau = 0.5 * (hi - (1 + alpha) + np.sqrt((hi - (1 + alpha)) ** 2 - 4 * alpha))
        val = np.sum(lo - np.log(lo))
        val += np.sum(hi - tau + np.log((tau + 1) / hi) + alpha * np.log(tau / alpha + 1))
        out.append(val)
    return np.array(out)


SHAPES_RANKS = [
    (256, 2304, 5),  # the DESIGN case: reported as 25 by an absolute-tolerance minimiser
    pytest.param(2304, 256, 5, marks=pytest.mark.slow),  # ~5 s: the transpose of the first
    (64, 576, 10),
    (576, 64, 10),
    (128, 1152, 1),
    (512, 512, 20),
    (27, 400, 4),
    (300, 300, 40),
]


@pytest.mark.parametrize(("L", "M", "rank"), SHAPES_RANKS)
def test_recovers_planted_rank(L: int, M: int, rank: int) -> None:
    y = low_rank_plus_noise(L, M, rank, seed=L + M + rank)
    res = evbmf(y)
    assert res.rank == rank
    assert res.shape == (L, M)
    # The noise variance is estimated well (signal is tiny compared with the noise mass).
    assert res.sigma2 == pytest.approx(NOISE**2, rel=0.05, abs=0)
    # Threshold is consistent with the definition and separates signal from noise.
    s = torch.linalg.svdvals(y)
    n, m = min(L, M), max(L, M)
    alpha = n / m
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    assert res.threshold == pytest.approx(math.sqrt(m * res.sigma2 * x_bar), rel=1e-12, abs=0)
    assert float(s[rank - 1]) > res.threshold > float(s[rank])


@pytest.mark.parametrize(("L", "M", "rank"), [pytest.param(256, 2304, 5, marks=pytest.mark.slow),  # ~5 s
                                              (64, 576, 10), (512, 512, 20)])
def test_sigma2_minimises_omega_globally(L: int, M: int, rank: int) -> None:
    y = low_rank_plus_noise(L, M, rank, seed=7)
    s = torch.linalg.svdvals(y).numpy()
    n, m = min(L, M), max(L, M)
    res = evbmf(y)
    alpha = n / m
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    ub = np.sum(s**2) / (n * m)
    h_hat = min(math.ceil(n / (1 + alpha)) - 1, n)
    lb = max(s[h_hat] ** 2 / (m * x_bar), np.mean(s[h_hat:] ** 2) / m)
    assert lb <= res.sigma2 <= ub
    grid = np.exp(np.linspace(math.log(lb), math.log(ub), 4001))
    best_on_grid = omega_reference(grid, s, n, m).min()
    found = omega_reference(np.array([res.sigma2]), s, n, m)[0]
    assert found <= best_on_grid + 1e-9 * abs(best_on_grid)


@pytest.mark.parametrize("c", [1e-4, 7.3, 1e3])
@pytest.mark.parametrize(("L", "M", "rank"), [(256, 2304, 5), (576, 64, 10)])
def test_scale_invariance(L: int, M: int, rank: int, c: float) -> None:
    y = low_rank_plus_noise(L, M, rank, seed=3)
    base, scaled = evbmf(y), evbmf(c * y)
    assert scaled.rank == base.rank == rank
    assert scaled.sigma2 == pytest.approx(c**2 * base.sigma2, rel=1e-6, abs=0)
    assert scaled.threshold == pytest.approx(c * base.threshold, rel=1e-6, abs=0)


@pytest.mark.parametrize(("L", "M", "rank"), [(256, 2304, 5), (64, 576, 10), (300, 300, 40)])
def test_transpose_invariance(L: int, M: int, rank: int) -> None:
    y = low_rank_plus_noise(L, M, rank, seed=5)
    a, b = evbmf(y), evbmf(y.T)
    assert a.rank == b.rank == rank
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-6, abs=0)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-6, abs=0)
    assert b.shape == (M, L)


@pytest.mark.parametrize(("L", "M"), [(256, 2304), (2304, 256), (100, 100), (16, 432), (3, 7)])
@pytest.mark.parametrize("sigma", [1e-3, 1.0])
def test_pure_noise_gives_rank_zero(L: int, M: int, sigma: float) -> None:
    g = torch.Generator().manual_seed(L * M)
    res = evbmf(sigma * torch.randn(L, M, generator=g, dtype=torch.float64))
    assert res.rank == 0
    if min(L, M) > 10:
        assert res.sigma2 == pytest.approx(sigma**2, rel=0.05, abs=0)


@pytest.mark.parametrize("shape", [(3, 4), (1, 1), (7, 1), (20, 30)])
def test_zero_matrix(shape: tuple[int, int]) -> None:
    res = evbmf(torch.zeros(shape))
    assert res == VBMFResult(rank=0, sigma2=0.0, threshold=0.0, shape=shape)


def test_zero_singular_values_are_finite() -> None:
    s = torch.tensor([5.0, 3.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    res = evbmf_from_singular_values(s, 6, 40)
    assert math.isfinite(res.sigma2) and res.sigma2 > 0
    assert math.isfinite(res.threshold)
    assert res.rank == 3  # noise-free: every non-zero singular value is signal


@pytest.mark.parametrize(("L", "M", "rank"), [(20, 50, 3), (50, 20, 3), (8, 8, 1)])
def test_exactly_low_rank_without_noise(L: int, M: int, rank: int) -> None:
    g = torch.Generator().manual_seed(11)
    y = torch.randn(L, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, M, generator=g, dtype=torch.float64
    )
    # Zero rows add exact zero singular values on top of the round-off-level ones.
    y = torch.cat([y, torch.zeros(2, M, dtype=torch.float64)], dim=0)
    res = evbmf(y)
    assert res.rank == rank
    assert math.isfinite(res.sigma2) and res.sigma2 >= 0


def test_zero_rows_in_noisy_matrix() -> None:
    y = low_rank_plus_noise(64, 576, 6, seed=2)
    y[:5] = 0.0
    res = evbmf(y)
    assert res.rank == 6
    assert math.isfinite(res.sigma2) and res.sigma2 > 0


@pytest.mark.parametrize("shape", [(1, 40), (40, 1), (1, 1), (1, 2304)])
def test_vectors(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    res = evbmf(torch.randn(shape, generator=g, dtype=torch.float64))
    # A single singular value cannot be separated from the noise: the interval
    # [sigma2_lb, sigma2_ub] degenerates and EVBMF keeps nothing.
    assert res.rank == 0
    assert math.isfinite(res.sigma2) and res.sigma2 > 0
    assert res.shape == shape


@pytest.mark.parametrize(("L", "M", "rank"), [(256, 2304, 5), (576, 64, 10), (40, 40, 3)])
def test_from_singular_values_agrees(L: int, M: int, rank: int) -> None:
    y = low_rank_plus_noise(L, M, rank, seed=9)
    full = evbmf(y)
    s = linalg.svdvals(y)  # the same (single-threaded) LAPACK call as evbmf: bit-equal singular values
    for vals in (s, s.flip(0), s.numpy(), s.float()):
        res = evbmf_from_singular_values(vals, L, M)
        assert res.rank == full.rank == rank
        assert res.shape == (L, M)
    exact = evbmf_from_singular_values(s, L, M)
    assert exact.sigma2 == pytest.approx(full.sigma2, rel=1e-12, abs=0)
    assert exact.threshold == pytest.approx(full.threshold, rel=1e-12, abs=0)


@pytest.mark.parametrize("keep", [20, 40, 63])
def test_truncated_singular_values_with_residual(keep: int) -> None:
    y = low_rank_plus_noise(64, 576, 6, seed=4)
    s = torch.linalg.svdvals(y)
    full = evbmf(y)
    residual = float((s[keep:] ** 2).sum())
    res = evbmf_from_singular_values(s[:keep], 64, 576, residual=residual)
    assert res.rank == full.rank == 6
    assert res.sigma2 == pytest.approx(full.sigma2, rel=0.05, abs=0)


def test_numpy_and_float32_inputs() -> None:
    y = low_rank_plus_noise(64, 576, 6, seed=1)
    a, b, c = evbmf(y), evbmf(y.numpy()), evbmf(y.float())
    assert a == b
    assert c.rank == a.rank == 6
    assert c.sigma2 == pytest.approx(a.sigma2, rel=1e-4, abs=0)


def test_result_is_frozen() -> None:
    res = evbmf(torch.eye(3))
    with pytest.raises(AttributeError):
        res.rank = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (torch.zeros(2, 3, 4), ValueError, "expected a 2-D"),
        (torch.zeros(5), ValueError, "expected a 2-D"),
        (torch.zeros(0, 5), ValueError, "non-empty"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "finite"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, "finite"),
        (np.array([[1.0, np.inf]]), ValueError, "finite"),
        ([[1.0, 2.0]], TypeError, "got list"),
        (torch.zeros(2, 2, dtype=torch.complex64), TypeError, "expected a real"),
    ],
)
def test_evbmf_bad_input(bad: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        evbmf(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("s", "L", "M", "residual", "exc", "match"),
    [
        (torch.ones(2, 2), 4, 5, 0.0, ValueError, "1-D"),
        (torch.ones(5), 4, 6, 0.0, ValueError, "at most min"),
        (torch.tensor([1.0, -1.0]), 4, 5, 0.0, ValueError, ">= 0"),
        (torch.tensor([1.0, float("nan")]), 4, 5, 0.0, ValueError, "finite"),
        (torch.ones(2), 0, 5, 0.0, ValueError, "L >= 1"),
        (torch.ones(2), 4, 5, -1.0, ValueError, "residual"),
        (torch.ones(2), 4.0, 5, 0.0, TypeError, "L: expected an int"),
        ([1.0, 2.0], 4, 5, 0.0, TypeError, "got list"),
    ],
)
def test_from_singular_values_bad_input(
    s: object, L: object, M: int, residual: float, exc: type, match: str
) -> None:
    with pytest.raises(exc, match=match):
        evbmf_from_singular_values(s, L, M, residual)  # type: ignore[arg-type]
