"""A decomposed Linear as one module: the chain of small matrix products without module overhead.

A Tucker-2 or SVD block of a Linear is two or three tiny matrix products (the paper's L2 at
rank 1: 128 -> 1 -> 84). In eager mode each ``nn.Linear`` / 1x1 conv call costs a few
microseconds of module and dispatch overhead, more than the arithmetic, so the plain chain
of modules can be slower than the one Linear it replaced. :class:`LinearChain` runs the same
products as plain ``F.linear`` / ``matmul`` calls in one ``forward``:

    [channel mix S -> R_s at every position, flatten]  (the "Linear as a conv" block)
    or [x @ first^T]                                     (Tucker-2 of a plain Linear)
    -> x @ core^T -> x @ last^T + bias

Same parameters (count and values) as the block, differentiable, any leading dims for the
plain form.

Example:
    >>> import torch
    >>> from tucker_fx.kernels import LinearChain
    >>> chain = LinearChain(None, torch.randn(2, 16), torch.randn(8, 2), torch.zeros(8))
    >>> tuple(chain(torch.randn(5, 16)).shape)
    (5, 8)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LinearChain"]


@torch.fx.wrap
def _linear_chain(x: Tensor, first: Optional[Tensor], core_t: Tensor, last_t: Tensor, bias: Optional[Tensor],
                  flatten: bool) -> Tensor:
    # one node for torch.fx.symbolic_trace (the branches below read the input's rank)
    if flatten:
        b = x.shape[0]
        if first is not None:
            x = torch.matmul(first, x.reshape(b, x.shape[1], -1))
        x = x.reshape(b, -1)
    elif first is not None:
        x = F.linear(x, first)
    x = torch.matmul(x, core_t)
    if x.dim() == 2 and bias is not None:
        return torch.addmm(bias, x, last_t)
    x = torch.matmul(x, last_t)
    return x if bias is None else x + bias


class LinearChain(nn.Module):
    """``[first] -> [flatten] -> core -> last (+ bias)`` as one module.

    ``first`` is ``(R_s, S)`` or ``None``; ``core`` is ``(R_t, R_s * positions)`` with
    ``flatten`` (the input is a feature map ``(B, S, *spatial)``, mixed per position, then
    flattened channel-major as ``torch.flatten(x, 1)`` does) or ``(R_t, R_s)`` without;
    ``last`` is ``(T, R_t)``; ``bias`` is ``(T,)`` or ``None``. The tensors are copied into
    Parameters whose ``requires_grad`` follows the given tensors'.
    """

    def __init__(self, first: Optional[Tensor], core: Tensor, last: Tensor, bias: Optional[Tensor],
                 *, flatten: bool = False) -> None:
        super().__init__()
        for name, t in (("core", core), ("last", last)):
            if t.dim() != 2:
                raise ValueError(f"LinearChain.{name}: expected a 2-D matrix, got shape {tuple(t.shape)}")
        if first is not None:
            # flattened: core reads R_s channels x positions; plain: core reads R_s features
            feeds = core.shape[1] % first.shape[0] == 0 if flatten else first.shape[0] == core.shape[1]
            if first.dim() != 2 or not feeds:
                raise ValueError(f"LinearChain: first {tuple(first.shape)} does not feed core {tuple(core.shape)}")
        if last.shape[1] != core.shape[0]:
            raise ValueError(f"LinearChain: last {tuple(last.shape)} does not follow core {tuple(core.shape)}")
        if bias is not None and tuple(bias.shape) != (last.shape[0],):
            raise ValueError(f"LinearChain: bias must have shape ({last.shape[0]},), got {tuple(bias.shape)}")

        def param(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)

        self.first = param(first) if first is not None else None
        # stored transposed: x @ W^T as one mm/addmm, without F.linear's transpose dispatch
        self.core_t = param(core.mT.contiguous())
        self.last_t = param(last.mT.contiguous())
        self.bias = param(bias) if bias is not None else None
        self.flatten = flatten

    @classmethod
    def from_block(cls, block: nn.Module) -> "LinearChain":
        """The chain of a :class:`~tucker_fx.passes.blocks.TuckerBlock` whose core is a Linear."""
        first = getattr(block, "first", None)
        f = None if first is None else first.weight.reshape(first.weight.shape[0], first.weight.shape[1])
        last = block.last
        return cls(f, block.core.weight, last.weight, last.bias, flatten=bool(getattr(block, "flatten", False)))

    def forward(self, x: Tensor) -> Tensor:
        return _linear_chain(x, self.first, self.core_t, self.last_t, self.bias, self.flatten)

    def macs_per_row(self, in_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates per output row (a sample; a token without ``flatten``)."""
        macs = self.core_t.numel() + self.last_t.numel()
        if self.first is not None:
            macs += self.first.numel() * (math.prod(in_shape[2:]) if self.flatten else 1)
        return macs

    def extra_repr(self) -> str:
        chain = " -> ".join(map(str, (*self.core_t.shape, self.last_t.shape[1])))
        if self.first is None:
            return chain
        r_s, s = self.first.shape
        if self.flatten:
            return f"mix {s} -> {r_s} per position, flatten, {chain}"
        return f"{s} -> {chain}"
