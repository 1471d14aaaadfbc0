"""Analytic empirical variational Bayesian matrix factorisation (EVBMF) rank selection.

Implements the global analytic solution of Nakajima, Sugiyama, Babacan and Tomioka,
"Global analytic solution of fully-observed variational Bayesian matrix factorization"
(JMLR 2013), in the form written out below. Only the singular values of the
matrix are needed; no singular vectors are ever formed.

For ``Y`` of shape ``(L, M)`` with ``L <= M`` (transposed otherwise), ``alpha = L / M``,
``H <= L`` known singular values ``gamma_1 >= ... >= gamma_H`` and
``residual = ||Y||_F^2 - sum(gamma^2)``::

    tau_bar = 2.5129 sqrt(alpha)
    x_bar   = (1 + tau_bar) (1 + alpha / tau_bar)
    x_h     = gamma_h^2 / (M sigma2)
    tau(x)  = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2
    Omega(sigma2) = sum_{x_h <= x_bar} (x_h - ln x_h)
                  + sum_{x_h >  x_bar} (x_h - tau + ln((tau + 1) / x_h) + alpha ln(tau / alpha + 1))
                  + residual / (M sigma2) + (L - H) ln sigma2

``sigma2`` minimises ``Omega`` over ``[sigma2_lb, sigma2_ub]``; the rank is the number of
singular values above ``gamma_EVB = sqrt(M sigma2 x_bar)``.

The 1-D minimisation is done in the rescaled variable ``v = ln(sigma2 / sigma2_ub)``: a dense
grid scan (``Omega`` need not be unimodal) followed by a golden-section refinement with a
tolerance on ``v``, i.e. a *relative* tolerance on ``sigma2``. An absolute tolerance on
``sigma2`` itself (what the common Python ports do, with sigma2 ~ 1e-6 for conv weights)
stops at the first probe and over-estimates the rank several times.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import linalg

__all__ = ["VBMFResult", "evbmf", "evbmf_from_singular_values"]

_TAU_BAR_COEF = 2.5129
# Singular values below ``gamma_1 * _FLOOR_REL`` (exact zeros included) are raised to it so
# that ``ln x_h`` stays finite; this is the round-off level of a float64 SVD anyway.
_FLOOR_REL = float(np.finfo(np.float64).eps)
_GRID_POINTS = 129
_GOLDEN_TOL = 1e-10  # on v = ln(sigma2 / sigma2_ub): relative tolerance on sigma2
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class VBMFResult:
    """Outcome of EVBMF on one matrix.

    Attributes:
        rank: number of singular values strictly above ``threshold`` (0 is a valid answer:
            the matrix is indistinguishable from noise).
        sigma2: estimated noise variance per entry, in the scale of the input matrix.
        threshold: ``gamma_EVB = sqrt(M * sigma2 * x_bar)``, the singular-value cut-off.
        shape: ``(L, M)`` as given, before any transposition.
    """

    rank: int
    sigma2: float
    threshold: float
    shape: tuple[int, int]


def evbmf(matrix: torch.Tensor | np.ndarray) -> VBMFResult:
    """Select the rank of a 2-D matrix by analytic empirical VBMF.

    The singular values are computed in float64 with ``torch.linalg.svdvals`` (no
    singular vectors) and passed to :func:`evbmf_from_singular_values`.

    Args:
        matrix: a real 2-D ``torch.Tensor`` or ``numpy.ndarray`` with finite entries.

    Returns:
        A :class:`VBMFResult`; ``shape`` is the shape as given.

    Raises:
        TypeError: ``matrix`` is neither a tensor nor an array, or is complex/non-numeric.
        ValueError: ``matrix`` is not 2-D, is empty, or has NaN/Inf entries.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> signal = torch.randn(64, 3, generator=g, dtype=torch.float64) @ torch.randn(
        ...     3, 200, generator=g, dtype=torch.float64)
        >>> noise = 0.01 * torch.randn(64, 200, generator=g, dtype=torch.float64)
        >>> evbmf(signal + noise).rank
        3
    """
    y = _as_float64_matrix(matrix)
    shape = (int(y.shape[0]), int(y.shape[1]))
    s = linalg.svdvals(y)
    return _evbmf_core(s.numpy(), shape, 0.0)


def evbmf_from_singular_values(
    s: torch.Tensor | np.ndarray, L: int, M: int, residual: float = 0.0
) -> VBMFResult:
    """EVBMF from precomputed singular values of an ``L x M`` matrix.

    Args:
        s: 1-D singular values (any order; sorted internally), ``len(s) <= min(L, M)``.
            Values must be finite and >= 0 (tiny negative round-off, e.g. from square roots
            of Gram eigenvalues, should be clamped by the caller).
        L: number of rows of the matrix (the result's ``shape`` is ``(L, M)``).
        M: number of columns.
        residual: ``||Y||_F^2 - sum(s^2)``, the energy of the singular values *not* given;
            0 when all ``min(L, M)`` singular values are given.

    Returns:
        A :class:`VBMFResult` with ``shape == (L, M)``.

    Raises:
        TypeError: ``s`` is not a tensor/array, or ``L``/``M`` are not integers.
        ValueError: bad sizes, too many values, negative/NaN/Inf values or residual.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(
        ...     3, 100, generator=g, dtype=torch.float64)
        >>> y = y + 0.01 * torch.randn(40, 100, generator=g, dtype=torch.float64)
        >>> r = evbmf_from_singular_values(torch.linalg.svdvals(y), 40, 100)
        >>> (r.rank, r.rank == evbmf(y).rank)
        (3, True)
    """
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
        raise TypeError(f"L: expected an int, got {type(L).__name__}")
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)):
        raise TypeError(f"M: expected an int, got {type(M).__name__}")
    L, M = int(L), int(M)
    if L < 1 or M < 1:
        raise ValueError(f"expected L >= 1 and M >= 1, got L={L}, M={M}")
    if isinstance(s, torch.Tensor):
        if s.is_complex() or not (s.is_floating_point() or s.dtype in _TORCH_INT_DTYPES):
            raise TypeError(f"s: expected a real tensor, got dtype {s.dtype}")
        arr = s.detach().to(device="cpu", dtype=torch.float64).numpy()
    elif isinstance(s, np.ndarray):
        if s.dtype.kind not in "fiub":
            raise TypeError(f"s: expected a real array, got dtype {s.dtype}")
        arr = np.asarray(s, dtype=np.float64)
    else:
        raise TypeError(f"s: expected a torch.Tensor or numpy.ndarray, got {type(s).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"s: expected a 1-D vector of singular values, got shape {arr.shape}")
    if arr.size > min(L, M):
        raise ValueError(
            f"s: expected at most min(L, M) = {min(L, M)} singular values, got {arr.size}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("s: expected finite singular values, got NaN or Inf")
    if np.any(arr < 0):
        raise ValueError(f"s: expected singular values >= 0, got min {arr.min()!r}")
    residual = float(residual)
    if not math.isfinite(residual) or residual < 0:
        raise ValueError(f"residual: expected a finite value >= 0, got {residual!r}")
    return _evbmf_core(arr, (L, M), residual)


_TORCH_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_float64_matrix(matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(matrix, np.ndarray):
        if matrix.dtype.kind not in "fiub":
            raise TypeError(f"matrix: expected a real numeric array, got dtype {matrix.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64))
    elif isinstance(matrix, torch.Tensor):
        if matrix.is_complex() or not (
            matrix.is_floating_point() or matrix.dtype in _TORCH_INT_DTYPES + (torch.bool,)
        ):
            raise TypeError(f"matrix: expected a real tensor, got dtype {matrix.dtype}")
        t = matrix.detach().to(device="cpu", dtype=torch.float64)
    else:
        raise TypeError(
            f"matrix: expected a torch.Tensor or numpy.ndarray, got {type(matrix).__name__}"
        )
    if t.ndim != 2:
        raise ValueError(f"matrix: expected a 2-D matrix, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"matrix: expected a non-empty matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("matrix: expected finite entries, got NaN or Inf")
    return t


def _evbmf_core(s: np.ndarray, shape: tuple[int, int], residual: float) -> VBMFResult:
    """EVBMF on validated float64 singular values ``s`` of a matrix of ``shape``."""
    L, M = min(shape), max(shape)  # transpose so that L <= M: singular values are unchanged
    gamma = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    H = int(gamma.size)
    alpha = L / M
    tau_bar = _TAU_BAR_COEF * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    top = float(gamma[0]) if H else 0.0
    if residual > 0.0:
        top = max(top, math.sqrt(residual / (L - H)) if H < L else top)
    if top == 0.0 or not math.isfinite(top):  # all-zero matrix: no signal, no noise
        return VBMFResult(rank=0, sigma2=0.0, threshold=0.0, shape=shape)

    # Work in units of gamma_1 (scale-free); floor zeros so that ln(x_h) is finite.
    floor = _FLOOR_REL
    g = np.maximum(gamma / top, floor)
    g2 = g * g
    res = residual / (top * top)
    if H < L:
        res = max(res, (L - H) * floor * floor)  # the unseen values are >= the floor too

    total = float(g2.sum()) + res
    ub = total / (L * M)
    h_hat = min(math.ceil(L / (1.0 + alpha)) - 1, H)
    # sigma2_lb = max(gamma_{h+1}^2 / (M x_bar), mean_{h > h_hat} gamma_h^2 / M), where the
    # L - H singular values not given carry the residual energy.
    tail_energy = float(g2[h_hat:].sum()) + res
    tail_mean = tail_energy / (L - h_hat)
    next_g2 = float(g2[h_hat]) if h_hat < H else res / (L - H)
    lb = max(next_g2 / (M * x_bar), tail_mean / M)

    if lb >= ub:  # degenerate interval (e.g. a 1 x N matrix): take the upper bound
        sigma2_n = ub
    else:
        omega = _make_objective(g2, res, L, M, H, alpha, x_bar, ub)
        v = _minimise_1d(omega, math.log(lb / ub), 0.0)
        sigma2_n = ub * math.exp(v)

    sigma2 = sigma2_n * top * top
    threshold = math.sqrt(M * sigma2 * x_bar)
    # Compare in normalised units against the unfloored values (exact zeros never count).
    thr_n = math.sqrt(M * sigma2_n * x_bar)
    rank = int(np.count_nonzero(gamma / top > thr_n))
    return VBMFResult(rank=rank, sigma2=float(sigma2), threshold=float(threshold), shape=shape)


def _make_objective(
    g2: np.ndarray, res: float, L: int, M: int, H: int, alpha: float, x_bar: float, ub: float
) -> Callable[[np.ndarray | float], np.ndarray]:
    """Omega as a function of v = ln(sigma2 / ub), vectorised over an array of v."""

    def omega(v: np.ndarray | float) -> np.ndarray:
        v = np.atleast_1d(np.asarray(v, dtype=np.float64))
        sigma2 = ub * np.exp(v)[:, None]  # (P, 1)
        x = g2[None, :] / (M * sigma2)  # (P, H)
        big = x > x_bar
        # Below the threshold: x - ln x.
        low_terms = np.where(big, 0.0, x - np.log(x))
        xb = np.where(big, x, 2.0 * x_bar)  # keep the sqrt argument positive off-branch
        d = xb - (1.0 + alpha)
        tau = 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))
        high = xb - tau + np.log((tau + 1.0) / xb) + alpha * np.log(tau / alpha + 1.0)
        high_terms = np.where(big, high, 0.0)
        out = (low_terms + high_terms).sum(axis=1)
        out += res / (M * sigma2[:, 0]) + (L - H) * np.log(sigma2[:, 0])
        return out

    return omega


def _minimise_1d(f: Callable[[np.ndarray | float], np.ndarray], a: float, b: float) -> float:
    """Global-ish minimum of ``f`` on ``[a, b]``: grid scan, then golden section.

    ``f`` maps an array of points to an array of values. The golden-section search runs in
    the grid cell pair around the best grid point, to an absolute tolerance ``_GOLDEN_TOL``
    on the (logarithmic) variable.
    """
    grid = np.linspace(a, b, _GRID_POINTS)
    vals = f(grid)
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    best_x, best_f = float(grid[i]), float(vals[i])
    c = hi - _INV_PHI * (hi - lo)
    d = lo + _INV_PHI * (hi - lo)
    fc, fd = float(f(c)[0]), float(f(d)[0])
    while hi - lo > _GOLDEN_TOL:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - _INV_PHI * (hi - lo)
            fc = float(f(c)[0])
        else:
            lo, c, fc = c, d, fd
            d = lo + _INV_PHI * (hi - lo)
            fd = float(f(d)[0])
    x = 0.5 * (lo + hi)
    fx = float(f(x)[0])
    return x if fx <= best_f else best_x
