"""The decomposed layer as modules: factor tensors in, ``TuckerBlock`` out.

A ``TuckerBlock`` holds ``first`` (channel mix S -> R_s, absent for Tucker-1), ``core`` and
``last`` (R_t -> T with the bias). The rewrite calls the three children as separate graph
nodes so that later passes can see and fuse them; the block's own ``forward`` runs the same
chain, so it also works on its own.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.passes.blocks import build_block
    >>> conv = nn.Conv2d(8, 16, 3, padding=1)
    >>> block, err = build_block(conv.weight, conv.bias, kind="tucker2", ranks=(8, 16), op="conv",
    ...                          conv_args=dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1)))
    >>> x = torch.randn(1, 8, 5, 5)
    >>> bool(torch.allclose(block(x), conv(x), atol=1e-5)), err < 1e-6
    (True, True)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from tucker_fx.decomposition import (
    data_aware_svd,
    data_aware_tucker1,
    data_aware_tucker2,
    relative_error,
    truncated_svd,
    tucker1,
    tucker2,
)

__all__ = ["TuckerBlock", "build_block", "corrected_bias", "data_aware_inputs"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class TuckerBlock(nn.Module):
    """first -> [flatten] -> core -> last."""

    def __init__(self, first: Optional[nn.Module], core: nn.Module, last: nn.Module,
                 *, kind: str, ranks: tuple[int, ...], flatten: bool = False) -> None:
        super().__init__()
        if first is not None:
            self.first = first
        self.core = core
        self.last = last
        self.kind, self.ranks, self.flatten = kind, tuple(ranks), flatten
        self.partial = False  # set when a merge moved one of its maps into a neighbour

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "first"):
            x = self.first(x)
        if self.flatten:
            x = torch.flatten(x, 1)
        for child in ("core", "last"):
            if hasattr(self, child):
                x = getattr(self, child)(x)
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind}, ranks={self.ranks}" + (", flatten" if self.flatten else "")


def _set(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], like: torch.Tensor) -> nn.Module:
    """Fill ``module`` with the factor ``weight`` (and ``bias``) on ``like``'s device and dtype;
    its parameters train exactly when ``like`` (the original layer's weight) does."""
    module = module.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape))
        if bias is not None:
            module.bias.copy_(bias)
    for p in module.parameters():
        p.requires_grad_(like.requires_grad)
    return module


def data_aware_inputs(op: str, kind: str, stats: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`build_block` for data-aware factors from a layer's calibration
    statistics (:class:`~tucker_fx.analysis.calibration.LayerStats`): centred covariances (the mean's share
    of the error goes into the bias) and the input mean. A conv's input factor stays weight-only: its
    channel covariance ignores the correlation across the kernel's positions, and whitening by it made
    the trained THETIS net's C2 worse; its output factor is the response PCA. Statistics collected on a
    partly compressed network carry the uncompressed input mean (``reference_in_mean``): the bias then
    also absorbs the mean drift of the layers before."""
    in_cov, out_cov = stats.centred()
    means = {"in_mean": stats.in_mean, "reference_in_mean": getattr(stats, "reference_in_mean", None)}
    if op == "linear":
        return {"in_cov": in_cov, "out_cov": out_cov if kind == "tucker2" else None, **means}
    return {"out_cov": out_cov, **means}


def corrected_bias(w: torch.Tensor, approx: torch.Tensor, b: Optional[torch.Tensor],
                   in_mean: Optional[torch.Tensor],
                   reference_in_mean: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``b`` plus the approximation's error on the mean input (``None`` in, ``None`` out without a mean).

    With ``reference_in_mean`` (the input mean of the uncompressed network, ``in_mean`` that of the
    compressed one) the new bias makes the block's mean output the original layer's:
    ``b + W m_ref - W_hat m`` (sums over kernel positions).

    Example:
        >>> import torch
        >>> w, m = torch.randn(3, 4), torch.randn(4)
        >>> b = corrected_bias(w, torch.zeros(3, 4), torch.zeros(3), m)
        >>> bool(torch.allclose(b, w @ m, atol=1e-6))
        True
    """
    if in_mean is None:
        return b
    sums = lambda t: t.to(w.device).double().reshape(w.shape[0], w.shape[1], -1).sum(-1)
    mean = in_mean.to(device=w.device, dtype=torch.float64)
    reference = mean if reference_in_mean is None else reference_in_mean.to(device=w.device, dtype=torch.float64)
    delta = sums(w) @ reference - sums(approx) @ mean
    out = delta if b is None else b.double() + delta
    return out.to(w.dtype)


def _pointwise(dims: int, cin: int, cout: int, bias: bool) -> nn.Module:
    return _CONV[dims](cin, cout, 1, bias=bias) if dims else nn.Linear(cin, cout, bias=bias)


def build_block(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    kind: str,
    ranks: tuple[int, ...],
    op: str,
    conv_args: Optional[dict[str, Any]] = None,
    feature_shape: Optional[tuple[int, ...]] = None,
    hooi_iters: int = 2,
    solver: str = "gram",
    in_cov: Optional[torch.Tensor] = None,
    out_cov: Optional[torch.Tensor] = None,
    in_mean: Optional[torch.Tensor] = None,
    reference_in_mean: Optional[torch.Tensor] = None,
) -> tuple[TuckerBlock, float]:
    """Decompose ``weight`` and build the block; returns it and the weight's relative error.

    ``op`` is ``"conv"`` or ``"linear"``; ``conv_args`` carries stride/padding/dilation/
    padding_mode for the core conv; ``feature_shape = (S, *spatial)`` makes a Linear's
    Tucker-2 "as a conv" over the flattened feature map. ``solver`` picks the Tucker-2 solver
    (:func:`~tucker_fx.decomposition.tucker2`: ``"gram"`` or ``"tensorly"``). ``in_cov`` / ``out_cov``
    (channel second moments of the layer's input and pre-bias output on calibration data) make the
    factors data-aware (:mod:`~tucker_fx.decomposition.data_aware`); a Linear's Tucker-2 "as a conv"
    stays weight-only (its input statistics are over the flattened features, not the channels).
    With ``in_mean`` (the input's channel mean; the covariances then centred), the approximation's error
    on the mean input goes into the bias: ``b + sum_k (W - W_hat)[:, :, k] @ mean`` (exact for a
    Linear and away from a conv's zero-padded border), so the factors only need to fit the variation;
    ``reference_in_mean`` (the uncompressed network's input mean) also takes in the drift of the layers
    before (see :func:`corrected_bias`).
    """
    aware = in_cov is not None or out_cov is not None
    w = weight.detach()
    like = weight  # device, dtype and requires_grad of the factors (``w`` never requires grad)
    t_out = w.shape[0]
    b = bias.detach() if bias is not None else None
    if op == "conv":
        dims = w.dim() - 2
        cargs = dict(conv_args or {})
        kernel = tuple(w.shape[2:])
        s_in = w.shape[1]
        if kind == "tucker2":
            rs, rt = ranks
            dec = (data_aware_tucker2(w, (rs, rt), in_cov=in_cov, out_cov=out_cov, n_iter=hooi_iters) if aware
                   else tucker2(w, (rs, rt), n_iter=hooi_iters, solver=solver))
            approx = dec.reconstruct()
            b2 = corrected_bias(w, approx, b, in_mean, reference_in_mean)
            first = _set(_pointwise(dims, s_in, rs, False), dec.u_s.t(), None, like)
            core = _set(_CONV[dims](rs, rt, kernel, bias=False, **cargs), dec.core, None, like)
            last = _set(_pointwise(dims, rt, t_out, b2 is not None), dec.u_t, b2, like)
            return TuckerBlock(first, core, last, kind=kind, ranks=ranks), relative_error(w, approx)
        if kind == "tucker1":
            (r,) = ranks
            dec1 = data_aware_tucker1(w, r, out_cov=out_cov) if out_cov is not None else tucker1(w, r)
            approx = dec1.reconstruct()
            b2 = corrected_bias(w, approx, b, in_mean, reference_in_mean)
            core = _set(_CONV[dims](s_in, r, kernel, bias=False, **cargs), dec1.core, None, like)
            last = _set(_pointwise(dims, r, t_out, b2 is not None), dec1.u_t, b2, like)
            return TuckerBlock(None, core, last, kind=kind, ranks=ranks), relative_error(w, approx)
        raise ValueError(f"kind {kind!r} is not defined for a conv; expected 'tucker2' or 'tucker1'")
    if op != "linear":
        raise ValueError(f"op must be 'conv' or 'linear', got {op!r}")
    if kind in ("svd", "tucker1"):
        (r,) = ranks
        a, c = data_aware_svd(w, r, in_cov=in_cov) if in_cov is not None else truncated_svd(w, r)
        b2 = corrected_bias(w, c @ a, b, in_mean, reference_in_mean)
        first = _set(nn.Linear(w.shape[1], r, bias=False), a, None, like)
        last = _set(nn.Linear(r, t_out, bias=b2 is not None), c, b2, like)
        # TuckerBlock wants a core; for a plain SVD the first factor is it
        return TuckerBlock(None, first, last, kind="svd", ranks=ranks), relative_error(w, c @ a)
    if kind != "tucker2":
        raise ValueError(f"kind {kind!r} is not defined for a linear; expected 'svd' or 'tucker2'")
    rs, rt = ranks
    if feature_shape is not None:
        s_in, *spatial = feature_shape
        w4 = w.reshape(t_out, s_in, *spatial)
        dec = tucker2(w4, (rs, rt), n_iter=hooi_iters, solver=solver)
        first = _set(_pointwise(len(spatial), s_in, rs, False), dec.u_s.t(), None, like)
        core = _set(nn.Linear(rs * math.prod(spatial), rt, bias=False), dec.core.reshape(rt, -1), None, like)
        last = _set(nn.Linear(rt, t_out, bias=b is not None), dec.u_t, b, like)
        block = TuckerBlock(first, core, last, kind=kind, ranks=ranks, flatten=True)
        return block, relative_error(w4, dec.reconstruct())
    dec = (data_aware_tucker2(w, (rs, rt), in_cov=in_cov, out_cov=out_cov, n_iter=hooi_iters) if aware
           else tucker2(w, (rs, rt), n_iter=hooi_iters, solver=solver))
    approx = dec.reconstruct()
    b2 = corrected_bias(w, approx, b, in_mean, reference_in_mean)
    first = _set(nn.Linear(w.shape[1], rs, bias=False), dec.u_s.t(), None, like)
    core = _set(nn.Linear(rs, rt, bias=False), dec.core, None, like)
    last = _set(nn.Linear(rt, t_out, bias=b2 is not None), dec.u_t, b2, like)
    return TuckerBlock(first, core, last, kind=kind, ranks=ranks), relative_error(w, approx)
