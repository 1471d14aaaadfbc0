"""Factor algebra: the weight arithmetic that merges linear maps, exactly.

Tensors in, tensors out -- no FX, no modules. The graph passes (``passes/lowering.py``,
``passes/merge_linear.py``) decide *whether* to merge; these functions say *what* the merged
weights are. Conventions: a channel mix or Linear weight is a matrix ``(out, in)``; a conv
weight is ``(out, in, *kernel)`` with 1-3 spatial dims; biases are ``(out,)`` or ``None``.

- :func:`as_matrix` -- the ``(out, in)`` matrix of a Linear or pointwise (1x1) conv weight;
- :func:`compose_linear` -- ``x -> B(A x)`` as one affine map;
- :func:`absorb_into_conv` -- a bias-free channel mix before a conv, folded into its kernel;
- :func:`fold_into_flat_linear` -- a channel mix before ``flatten(1)`` and a Linear, folded
  into the Linear.

Each is exact in exact arithmetic (tests/test_algebra.py checks them against the composed
modules in float64).

>>> import torch
>>> mix, w = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
>>> x = torch.randn(1, 5, 8, 8, dtype=torch.float64)
>>> ref = torch.nn.functional.conv2d(torch.einsum("rs,bshw->brhw", mix, x), w, padding=1)
>>> bool(torch.allclose(torch.nn.functional.conv2d(x, absorb_into_conv(w, mix), padding=1), ref))
True
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["absorb_into_conv", "as_matrix", "compose_linear", "fold_into_flat_linear"]


def as_matrix(weight: Tensor) -> Tensor:
    """The ``(out, in)`` matrix of a Linear weight or of a pointwise conv weight ``(out, in, 1, ...)``.

    A view of ``weight`` (no copy, autograd kept).

    >>> as_matrix(torch.zeros(4, 3, 1, 1)).shape
    torch.Size([4, 3])
    """
    if weight.dim() < 2 or any(k != 1 for k in weight.shape[2:]):
        raise ValueError(
            f"expected a Linear weight (out, in) or a pointwise conv weight (out, in, 1, ...), "
            f"got shape {tuple(weight.shape)}"
        )
    return weight.reshape(weight.shape[0], weight.shape[1])


def _check_matrix(m: Tensor, name: str) -> None:
    if m.dim() != 2:
        raise ValueError(f"{name} must be a matrix (out, in), got shape {tuple(m.shape)}")


def _check_bias(b: Optional[Tensor], n: int, name: str) -> None:
    if b is not None and tuple(b.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")


def compose_linear(
    w_a: Tensor, b_a: Optional[Tensor], w_b: Tensor, b_b: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor]]:
    """``(W, b)`` of ``x -> B(A x)`` for affine maps ``A = (w_a, b_a)``, ``B = (w_b, b_b)``.

    ``W = W_B W_A`` and ``b = W_B b_A + b_B`` (``None`` when both biases are). Also merges two
    pointwise convs (pass :func:`as_matrix` of their weights): a channel mix per position.

    >>> w, b = compose_linear(torch.eye(2), torch.ones(2), 2 * torch.eye(2), None)
    >>> w.tolist(), b.tolist()
    ([[2.0, 0.0], [0.0, 2.0]], [2.0, 2.0])
    """
    _check_matrix(w_a, "w_a")
    _check_matrix(w_b, "w_b")
    if w_b.shape[1] != w_a.shape[0]:
        raise ValueError(
            f"w_b {tuple(w_b.shape)} does not follow w_a {tuple(w_a.shape)}: expected "
            f"w_b.shape[1] == {w_a.shape[0]}"
        )
    _check_bias(b_a, w_a.shape[0], "b_a")
    _check_bias(b_b, w_b.shape[0], "b_b")
    w = w_b @ w_a
    bias = None
    if b_a is not None:
        bias = w_b @ b_a
    if b_b is not None:
        bias = b_b.clone() if bias is None else bias + b_b
    return w, bias


def absorb_into_conv(weight: Tensor, mix: Tensor) -> Tensor:
    """The kernel ``(T, S, *k)`` of ``conv(mix(x), weight)`` for a bias-free channel mix ``(R, S)``.

    ``W'[t, s, ...] = sum_r W[t, r, ...] M[r, s]``. Exact for any stride, padding, dilation and
    padding mode of the conv (a channel mix commutes with them), not for a mix with a bias
    (zero padding would drop the bias at the borders), hence no bias argument.

    >>> absorb_into_conv(torch.randn(4, 3, 5, 5), torch.randn(3, 7)).shape
    torch.Size([4, 7, 5, 5])
    """
    _check_matrix(mix, "mix")
    if weight.dim() < 3 or weight.shape[1] != mix.shape[0]:
        raise ValueError(
            f"expected a conv weight (T, R={mix.shape[0]}, *k) after the mix {tuple(mix.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    return torch.einsum("tr...,rs->ts...", weight, mix)


def fold_into_flat_linear(
    w_lin: Tensor, b_lin: Optional[Tensor], mix: Tensor, b_mix: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor]]:
    """``(W, b)`` of the Linear on ``flatten(x, 1)`` equal to ``linear(flatten(mix(x), 1))``.

    ``mix`` ``(C, S)`` (bias ``b_mix``) is a channel mix at each of the ``P`` positions of a
    ``(B, S, *spatial)`` input; ``w_lin`` is ``(T, C * P)`` in flatten's (channel-major) order.
    ``W[t, s, p] = sum_c W_lin[t, c, p] M[c, s]``, returned as ``(T, S * P)``, and
    ``b = b_lin + sum_{c, p} W_lin[t, c, p] b_mix[c]``.

    >>> w, b = fold_into_flat_linear(torch.randn(10, 3 * 4), None, torch.randn(3, 2), None)
    >>> tuple(w.shape), b
    ((10, 8), None)
    """
    _check_matrix(w_lin, "w_lin")
    _check_matrix(mix, "mix")
    t, c = w_lin.shape[0], mix.shape[0]
    if w_lin.shape[1] % c:
        raise ValueError(
            f"w_lin {tuple(w_lin.shape)} does not read a flattened {c}-channel map: expected "
            f"in_features a multiple of {c}"
        )
    _check_bias(b_lin, t, "b_lin")
    _check_bias(b_mix, c, "b_mix")
    positions = w_lin.shape[1] // c
    wl = w_lin.reshape(t, c, positions)
    w = torch.einsum("tcp,cs->tsp", wl, mix).reshape(t, mix.shape[1] * positions)
    bias = b_lin.clone() if b_lin is not None else None
    if b_mix is not None:
        extra = torch.einsum("tcp,c->t", wl, b_mix)
        bias = extra if bias is None else bias + extra
    return w, bias
