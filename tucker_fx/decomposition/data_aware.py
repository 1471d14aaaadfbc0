"""Data-aware low-rank factors of conv and linear kernels, from calibration statistics.

Pure tensor math (no FX, no modules), the data-aware counterparts of :mod:`.tucker`: the same
kernel layout ``(T, S, *k)``, the same result types (:class:`~.tucker.Tucker2`,
:class:`~.tucker.Tucker1`, and the ``(first, second)`` pair of :func:`~.tucker.truncated_svd`),
float64 inside and the weight's dtype out, so a block builder uses them unchanged.

Two kinds of statistics, both channel second moments (not mean-centred) that
:class:`ChannelStats` accumulates while calibration batches stream through:

* ``in_cov`` ``(S, S)`` = ``E[x x^T]`` of the layer's input channels. The approximation error is
  measured on the layer's output, ``E||W x - W_hat x||^2`` ("whitening", as in
  activation-aware SVD / SVD-LLM): for a Linear this is exact, ``tr(D C D^T)`` with
  ``D = W - W_hat``. For a conv the covariance is over channels only and the kernel positions
  are treated as uncorrelated (spatial correlation of the input ignored, the usual
  approximation), giving ``sum_k tr(D_k C D_k^T) = ||D x_s C^{1/2}||_F^2``, with ``D_k`` the
  ``(T, S)`` slice of ``D`` at kernel position ``k``.
* ``out_cov`` ``(T, T)`` = ``E[y y^T]`` of the layer's pre-bias response ``y = W * x`` (Zhang et
  al. 2015, "Accelerating very deep convolutional networks"): the output factor is the leading
  eigenvectors, the projection that keeps most of the response. This one sees the full conv,
  spatial correlation included.

Covariances are symmetrised and damped before they are inverted (:func:`whitening`); a
covariance that is not symmetric positive semi-definite (within round-off) is refused.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(8, 6, 3, 3, generator=g)
    >>> x = torch.randn(64, 6, 5, 5, generator=g) * torch.tensor([4.0, 2, 1, .5, .2, .1]).view(1, 6, 1, 1)
    >>> stats = ChannelStats(6)
    >>> stats.update(x)
    >>> dec = data_aware_tucker2(w, (3, 4), in_cov=stats.second_moment())
    >>> tuple(dec.core.shape), tuple(dec.u_s.shape), tuple(dec.u_t.shape)
    ((4, 3, 3, 3), (6, 3), (8, 4))
    >>> c = stats.second_moment()
    >>> response_error(w, dec.reconstruct(), c) < response_error(w, tucker2(w, (3, 4)).reconstruct(), c)
    True
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import linalg
from .tucker import (
    Tucker1,
    Tucker2,
    _as_tks,
    _check_rank,
    _check_weight,
    _fix_signs,
    _gram_cols,
    _leading_eigvecs,
    truncated_svd,
    tucker1,
    tucker2,
)

__all__ = [
    "ChannelStats",
    "data_aware_svd",
    "data_aware_tucker1",
    "data_aware_tucker2",
    "response_error",
    "whitening",
]

# A covariance is accepted as symmetric when max|C - C^T| <= _SYM_RTOL * max|C|, and as positive
# semi-definite when its smallest eigenvalue is >= -_PSD_RTOL * trace(C) (float32 round-off).
_SYM_RTOL = 1e-5
_PSD_RTOL = 1e-6


# --------------------------------------------------------------------------- statistics


class ChannelStats:
    """Streaming second moment ``E[x x^T]`` of one channel dimension, in float64.

    ``update`` adds ``sum x_c x_c'`` over every other position of a batch (batch, spatial, or the
    leading dims of a Linear input ``(..., C)`` with ``dim=-1``): one reshape to ``(C, N)`` and
    one matrix product per batch; activations are never kept. The accumulator lives on the
    device of the first batch.

    Args:
        channels: ``C``, the size of the channel dimension.
        dim: which dimension of the batches holds the channels (``1`` for NC..., ``-1`` for
            a Linear input).

    Example:
        >>> stats = ChannelStats(3)
        >>> stats.update(torch.ones(2, 3, 4, 4))
        >>> stats.count, stats.second_moment().tolist()[0]
        (32, [1.0, 1.0, 1.0])
    """

    def __init__(self, channels: int, dim: int = 1) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels: expected an int >= 1, got {channels!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
        self.channels = channels
        self.dim = dim
        self._count = 0
        self._sum: Optional[torch.Tensor] = None
        self._first: Optional[torch.Tensor] = None  # sum of the channel vectors (for the mean)

    @property
    def count(self) -> int:
        """How many channel vectors (positions) have been accumulated.

        Example:
            >>> s = ChannelStats(4, dim=-1)
            >>> s.update(torch.randn(5, 7, 4))
            >>> s.count
            35
        """
        return self._count

    def update(self, x: torch.Tensor) -> None:
        """Accumulate the batch ``x`` (any shape with ``x.shape[dim] == channels``).

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: ``dim`` out of range, wrong channel count, non-finite entries.

        Example:
            >>> s = ChannelStats(2)
            >>> s.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            >>> s.second_moment().tolist()
            [[5.0, 7.0], [7.0, 10.0]]
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        if not -x.ndim <= self.dim < x.ndim:
            raise ValueError(
                f"x: expected a channel dim {self.dim} within its {x.ndim} dims, got shape {tuple(x.shape)}"
            )
        c = self.channels
        if x.shape[self.dim] != c:
            raise ValueError(
                f"x: expected {c} channels in dim {self.dim}, got {x.shape[self.dim]} (shape {tuple(x.shape)})"
            )
        x = x.detach()
        n = x.numel() // c
        if n == 0:
            return
        if self.dim in (-1, x.ndim - 1):
            rows = x.reshape(n, c).to(torch.float64)  # one cast copy; the reshape is a view when contiguous
            gram = rows.mT @ rows
            first = rows.sum(0)
        else:
            cols = torch.empty((c, n), dtype=torch.float64, device=x.device)
            cols.view(x.movedim(self.dim, 0).shape).copy_(x.movedim(self.dim, 0))  # one copy + cast
            gram = cols @ cols.mT
            first = cols.sum(1)
        if not bool(torch.isfinite(gram).all()):
            raise ValueError("x: expected finite entries, got NaN or Inf (the batch was not accumulated)")
        if self._sum is None:
            self._sum, self._first = gram, first
        else:
            self._sum += gram.to(self._sum.device)
            assert self._first is not None
            self._first += first.to(self._first.device)
        self._count += n

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` ``(C, C)`` in float64: the accumulated sum over ``count``, symmetrised.

        Raises:
            ValueError: nothing accumulated yet.

        Example:
            >>> s = ChannelStats(2, dim=0)
            >>> s.update(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
            >>> s.second_moment().tolist()
            [[2.0, 0.0], [0.0, 2.0]]
        """
        if self._sum is None or self._count == 0:
            raise ValueError("second_moment: expected at least one accumulated position, got count 0")
        m = self._sum / self._count
        return 0.5 * (m + m.mT)

    def mean(self) -> torch.Tensor:
        """``E[x]`` ``(C,)`` in float64.

        Example:
            >>> s = ChannelStats(2, dim=-1)
            >>> s.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            >>> s.mean().tolist()
            [2.0, 3.0]
        """
        if self._first is None or self._count == 0:
            raise ValueError("mean: expected at least one accumulated position, got count 0")
        return self._first / self._count

    def covariance(self) -> torch.Tensor:
        """``E[(x - E x)(x - E x)^T]`` ``(C, C)`` in float64 (the centred second moment), symmetrised.

        Example:
            >>> s = ChannelStats(1, dim=-1)
            >>> s.update(torch.tensor([[1.0], [3.0]]))
            >>> s.covariance().tolist()
            [[1.0]]
        """
        m = self.mean()
        c = self.second_moment() - torch.outer(m, m)
        return 0.5 * (c + c.mT)

    def __repr__(self) -> str:
        return f"ChannelStats(channels={self.channels}, dim={self.dim}, count={self._count})"


# --------------------------------------------------------------------------- validation


def _check_cov(cov: object, n: int, name: str, device: torch.device) -> torch.Tensor:
    """float64, symmetrised copy of a ``(n, n)`` covariance on ``device``; PSD is checked later."""
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cov).__name__}")
    if not cov.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {cov.dtype}")
    if tuple(cov.shape) != (n, n):
        raise ValueError(f"{name}: expected shape ({n}, {n}), got {tuple(cov.shape)}")
    c = cov.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"{name}: expected finite entries, got NaN or Inf")
    scale = float(c.abs().max())
    asym = float((c - c.mT).abs().max())
    if asym > _SYM_RTOL * scale:
        raise ValueError(
            f"{name}: expected a symmetric matrix, got max|C - C^T| = {asym:.3g} (max|C| = {scale:.3g})"
        )
    trace = float(c.diagonal().sum())
    if not trace > 0.0:
        raise ValueError(
            f"{name}: expected a positive semi-definite matrix with trace > 0, got trace {trace:.3g}"
        )
    return 0.5 * (c + c.mT)


def _check_psd(evals: torch.Tensor, trace: float, name: str) -> None:
    low = float(evals.min())
    if low < -_PSD_RTOL * trace:
        raise ValueError(
            f"{name}: expected a positive semi-definite matrix, got eigenvalue {low:.3g} (trace {trace:.3g})"
        )


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    return float(eps)


def _whiten(c: torch.Tensor, eps: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_d^{1/2}, C_d^{-1/2})`` of a checked float64 covariance, ``C_d = C + eps tr(C)/n I``."""
    n = c.shape[0]
    trace = float(c.diagonal().sum())
    evals, vecs = linalg.eigh(c)
    _check_psd(evals, trace, name)
    evals = evals.clamp_min(0.0) + eps * trace / n
    if not float(evals.min()) > 0.0:
        raise ValueError(
            f"{name}: expected a non-singular matrix when eps = 0, got eigenvalue {float(evals.min()):.3g}"
        )
    root = evals.sqrt()
    sqrt = (vecs * root) @ vecs.mT
    inv_sqrt = (vecs / root) @ vecs.mT
    return 0.5 * (sqrt + sqrt.mT), 0.5 * (inv_sqrt + inv_sqrt.mT)


def _response_factor(c: torch.Tensor, rank: int, name: str) -> torch.Tensor:
    """Leading ``rank`` eigenvectors of a checked response covariance, sign-fixed as in tucker2."""
    evals, vecs = linalg.eigh(c)
    _check_psd(evals, float(c.diagonal().sum()), name)
    return _fix_signs(vecs[:, -rank:].flip(-1))


def _check_ranks2(weight: torch.Tensor, ranks: object) -> tuple[int, int]:
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
        raise ValueError(f"ranks: expected a pair (R_s, R_t), got {ranks!r}")
    t, s = weight.shape[:2]
    return (_check_rank(ranks[0], s, "R_s (input-channel rank)"),
            _check_rank(ranks[1], t, "R_t (output-channel rank)"))


# ------------------------------------------------------------------------------ public


def whitening(cov: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a damped covariance and its inverse, in float64.

    With ``C_d = C + eps * trace(C) / n * I`` (``C`` symmetrised, round-off negative eigenvalues
    clamped to 0), returns ``(C_d^{1/2}, C_d^{-1/2})`` from one ``eigh``, so their product is the
    identity to round-off.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: not square, not symmetric, not positive semi-definite, trace <= 0, non-finite,
            ``eps < 0``, or singular with ``eps = 0``.

    Example:
        >>> sqrt, inv_sqrt = whitening(torch.tensor([[4.0, 0.0], [0.0, 9.0]]), eps=0)
        >>> sqrt.tolist(), bool(torch.allclose(sqrt @ inv_sqrt, torch.eye(2, dtype=torch.float64)))
        ([[2.0, 0.0], [0.0, 3.0]], True)
    """
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"cov: expected a torch.Tensor, got {type(cov).__name__}")
    if cov.ndim != 2 or cov.shape[0] == 0:
        raise ValueError(f"cov: expected a non-empty square (n, n) matrix, got shape {tuple(cov.shape)}")
    eps = _check_eps(eps)
    c = _check_cov(cov, cov.shape[0], "cov", cov.device)
    return _whiten(c, eps, "cov")


def data_aware_tucker2(
    weight: torch.Tensor,
    ranks: tuple[int, int],
    *,
    in_cov: Optional[torch.Tensor] = None,
    out_cov: Optional[torch.Tensor] = None,
    n_iter: int = 2,
    eps: float = 1e-6,
) -> Tucker2:
    """Data-aware Tucker-2 of ``weight`` ``(T, S, *k)`` at ``ranks = (R_s, R_t)``.

    Same result type as :func:`~.tucker.tucker2`, ``W_hat[t,s,...] = sum core[a,b,...] u_t[t,a]
    u_s[s,b]``; the block is ``conv1x1(u_s^T) -> core conv -> conv1x1(u_t)``.

    * Output mode, ``out_cov`` ``(T, T)`` given (``E[y y^T]`` of the pre-bias response, Zhang et
      al. 2015): ``u_t`` = its leading ``R_t`` eigenvectors, which minimise
      ``E||y - u_t u_t^T y||^2``.
    * Input mode, ``in_cov`` ``C`` ``(S, S)`` given (whitening, as SVD-LLM): the objective is
      ``||(W - W_hat) x_s C^{1/2}||_F^2`` = the expected output error with the conv input
      covariance over channels only (kernel positions treated as uncorrelated). With
      ``W~ = W x_s C^{1/2}`` and ``U~`` its leading mode-s subspace, the first 1x1 conv applies
      ``u_s^T = U~^T C^{-1/2}`` (so ``u_s = C^{-1/2} U~``, orthonormal in the ``C`` inner
      product: ``u_s^T C u_s = I``) and ``core = u_t^T W x_s (C^{1/2} U~)^T``.

    Which factors: with ``out_cov`` given, ``u_t`` is fixed by it and ``(u_s, core)`` are the
    exact minimiser of the input-mode objective given ``u_t`` (``n_iter`` is unused); without it,
    ``n_iter`` HOOI sweeps (HOSVD start) run on ``W~``, i.e. :func:`~.tucker.tucker2` of ``W~``
    mapped back, which is the weight-only result when ``in_cov`` is None too (``C = I``). ``C`` is
    damped as in :func:`whitening` with ``eps``. Exact (to float64 round-off) at full rank.

    Raises:
        ValueError: ranks outside ``1 <= R_s <= S``, ``1 <= R_t <= T``; covariance of the wrong
            shape, not symmetric PSD, non-finite; bad weight.
        TypeError: non-integer ranks, non-floating weight or covariance.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(8, 6, 3, 3, dtype=torch.float64, generator=g)
        >>> a = torch.randn(6, 6, dtype=torch.float64, generator=g)
        >>> b = torch.randn(8, 8, dtype=torch.float64, generator=g)
        >>> dec = data_aware_tucker2(w, (6, 8), in_cov=a @ a.T, out_cov=b @ b.T)
        >>> bool(torch.allclose(dec.reconstruct(), w, atol=1e-10))
        True
        >>> dec = data_aware_tucker2(w, (2, 3), in_cov=a @ a.T)
        >>> tuple(dec.core.shape), tuple(dec.u_s.shape), tuple(dec.u_t.shape)
        ((3, 2, 3, 3), (6, 2), (8, 3))
    """
    _check_weight(weight)
    r_s, r_t = _check_ranks2(weight, ranks)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter: expected an int >= 0, got {n_iter!r}")
    eps = _check_eps(eps)
    t, s = weight.shape[:2]
    dev = weight.device
    c_in = None if in_cov is None else _check_cov(in_cov, s, "in_cov", dev)
    c_out = None if out_cov is None else _check_cov(out_cov, t, "out_cov", dev)
    if c_in is None and c_out is None:
        return tucker2(weight, (r_s, r_t), n_iter=n_iter)

    spatial = weight.shape[2:]
    w = _as_tks(weight)  # (T, K, S) float64
    k = w.shape[1]
    sqrt = inv_sqrt = None
    if c_in is not None:
        sqrt, inv_sqrt = _whiten(c_in, eps, "in_cov")
        w = (w.reshape(t * k, s) @ sqrt).reshape(t, k, s)  # W~ = W x_s C^{1/2}
    if c_out is None:
        # HOOI on W~: tucker2 of it, laid out back as (T, S, *k)
        dec = tucker2(w.transpose(1, 2).reshape(t, s, *spatial), (r_s, r_t), n_iter=n_iter)
        core, u_til, u_t = dec.core, dec.u_s, dec.u_t
    else:
        u_t = _response_factor(c_out, r_t, "out_cov")
        y = (u_t.mT @ w.reshape(t, k * s)).reshape(r_t * k, s)  # u_t^T W~, rows (a, k)
        u_til = _leading_eigvecs(_gram_cols(y), r_s)
        core = (y @ u_til).reshape(r_t, k, r_s).transpose(1, 2).reshape(r_t, r_s, *spatial)
    u_s = u_til if inv_sqrt is None else inv_sqrt @ u_til
    dtype = weight.dtype
    return Tucker2(core=core.to(dtype).contiguous(), u_s=u_s.to(dtype).contiguous(),
                   u_t=u_t.to(dtype).contiguous())


def data_aware_tucker1(weight: torch.Tensor, rank: int, *, out_cov: Optional[torch.Tensor] = None) -> Tucker1:
    """Data-aware Tucker-1 (output mode) of a conv kernel ``(T, S, *k)``.

    ``u_t`` = the leading ``rank`` eigenvectors of ``out_cov`` ``(T, T)``, the second moment of the
    layer's pre-bias response ``y = W * x``, and ``core = u_t^T W``. This is the exact minimiser
    of the expected response error ``E||W * x - W_hat * x||^2`` over all Tucker-1 ``W_hat`` of
    that rank, for the full conv (spatial correlation included): for any ``u_t`` the error splits
    into ``E||(I - u_t u_t^T) y||^2`` plus a term that ``core = u_t^T W`` makes zero. With
    ``out_cov`` None it is :func:`~.tucker.tucker1`.

    Raises:
        ValueError: ``rank`` outside ``1 <= rank <= T``; ``out_cov`` not ``(T, T)`` symmetric PSD.

    Example:
        >>> w = torch.randn(16, 8, 3, 3)
        >>> y_cov = torch.diag(torch.arange(16.0, 0.0, -1.0))
        >>> dec = data_aware_tucker1(w, 4, out_cov=y_cov)
        >>> tuple(dec.core.shape), dec.u_t.abs().argmax(0).tolist()
        ((4, 8, 3, 3), [0, 1, 2, 3])
    """
    _check_weight(weight)
    t = weight.shape[0]
    r = _check_rank(rank, t, "rank (output-channel rank)")
    if out_cov is None:
        return tucker1(weight, r)
    c_out = _check_cov(out_cov, t, "out_cov", weight.device)
    u_t = _response_factor(c_out, r, "out_cov")
    w0 = weight.detach().to(torch.float64).reshape(t, -1)
    core = (u_t.mT @ w0).reshape(r, *weight.shape[1:])
    return Tucker1(core=core.to(weight.dtype).contiguous(), u_t=u_t.to(weight.dtype).contiguous())


def data_aware_svd(
    weight: torch.Tensor, rank: int, *, in_cov: Optional[torch.Tensor] = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factorisation of a Linear weight ``(out, in)`` that minimises ``E||W x - W_hat x||^2``.

    With ``in_cov`` ``C = E[x x^T]`` ``(in, in)`` (damped as in :func:`whitening`) and the SVD
    ``W C^{1/2} = U S V^T``: ``second = U_r`` (orthonormal columns) and
    ``first = S_r V_r^T C^{-1/2}`` ``(rank, in)``, ``W_hat = second @ first`` -- the exact minimiser
    of ``tr((W - W_hat) C (W - W_hat)^T)`` over rank-``rank`` matrices (SVD-LLM), whose minimum
    is the sum of the trailing squared singular values of ``W C^{1/2}``. Same convention as
    :func:`~.tucker.truncated_svd`, which it is when ``in_cov`` is None.

    Raises:
        ValueError: not 2-D, ``rank`` outside ``1 <= rank <= min(out, in)``, ``in_cov`` not
            ``(in, in)`` symmetric PSD.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(10, 4, dtype=torch.float64, generator=g)
        >>> a = torch.randn(4, 4, dtype=torch.float64, generator=g)
        >>> first, second = data_aware_svd(w, 4, in_cov=a @ a.T)
        >>> tuple(first.shape), tuple(second.shape), bool(torch.allclose(second @ first, w))
        ((4, 4), (10, 4), True)
    """
    _check_weight(weight, "weight")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    r = _check_rank(rank, min(out_f, in_f), "rank")
    eps = _check_eps(eps)
    if in_cov is None:
        return truncated_svd(weight, r)
    sqrt, inv_sqrt = _whiten(_check_cov(in_cov, in_f, "in_cov", weight.device), eps, "in_cov")
    w = weight.detach().to(torch.float64)
    u, sv, vh = linalg.svd(w @ sqrt)
    u = u[:, :r]
    idx = u.abs().argmax(dim=0, keepdim=True)  # sign convention of truncated_svd
    signs = torch.sign(torch.gather(u, 0, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    second = u * signs
    first = ((sv[:r, None] * vh[:r]) * signs.mT) @ inv_sqrt
    return first.to(weight.dtype).contiguous(), second.to(weight.dtype).contiguous()


def response_error(weight: torch.Tensor, approx: torch.Tensor, in_cov: torch.Tensor) -> float:
    """Predicted relative output error ``sqrt(tr(D C D^T) / tr(W C W^T))``, ``D = weight - approx``.

    ``C = in_cov`` ``(S, S)`` is the input channel second moment (undamped). For a conv
    ``(T, S, *k)`` the traces are summed over kernel positions, ``sum_k tr(D_k C D_k^T)``: the
    kernel positions are treated as uncorrelated (spatial correlation ignored), exact for an
    input that is independent across positions with zero mean, and for a Linear always. A cheap
    stand-in for the measured ``||W x - W_hat x|| / ||W x||``. Returns 0.0 when both traces are
    zero and ``inf`` when only the denominator is.

    Raises:
        ValueError: shapes differ, ``in_cov`` not ``(S, S)`` symmetric PSD.

    Example:
        >>> w = torch.tensor([[1.0, 1.0]])
        >>> c = torch.diag(torch.tensor([1.0, 3.0]))
        >>> round(response_error(w, torch.tensor([[1.0, 0.0]]), c), 12)
        0.866025403784
    """
    _check_weight(weight)
    if not isinstance(approx, torch.Tensor):
        raise TypeError(f"approx: expected a torch.Tensor, got {type(approx).__name__}")
    if approx.shape != weight.shape:
        raise ValueError(f"approx: expected shape {tuple(weight.shape)}, got {tuple(approx.shape)}")
    s = weight.shape[1]
    c = _check_cov(in_cov, s, "in_cov", weight.device)
    trace = float(c.diagonal().sum())
    shift = _PSD_RTOL * trace * torch.eye(s, dtype=c.dtype, device=c.device)
    with linalg.single_threaded(c.device):  # PSD within round-off: C + tol * tr(C) * I is PD
        info = torch.linalg.cholesky_ex(c + shift).info
    if int(info) != 0:
        raise ValueError(
            f"in_cov: expected a positive semi-definite matrix, got an eigenvalue below {-_PSD_RTOL * trace:.3g}"
        )
    w = _as_tks(weight).reshape(-1, s)
    d = w - _as_tks(approx.to(weight.device)).reshape(-1, s)
    num = float(((d @ c) * d).sum().clamp_min(0.0))
    den = float(((w @ c) * w).sum().clamp_min(0.0))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
