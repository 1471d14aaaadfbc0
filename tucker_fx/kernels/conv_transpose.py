"""A transposed conv whose stride equals its kernel (the usual x2 "up-conv" of U-Nets) as one matrix
product and a reshuffle.

With ``stride == kernel_size`` and no padding, every input position writes its own ``k1 x k2 x k3``
output patch and patches never overlap: the output is ``W^T x`` per position (``C_in`` ->
``C_out * k1 k2 k3``) with the patch dims moved next to the spatial dims they refine. On the CPU
ATen runs it as a generic col2im (``slow_conv_transpose3d``) or through mkldnn. Measured on this
project's 2-core CPU (one thread, fp32, batch 1): MONAI BasicUNet's last up-conv, 32 -> 32,
kernel 2, on 32^3 -> 64^3, took 98.6 ms as ``aten.conv_transpose3d`` in the compressed model's node
profile; this form runs it as a 256 x 32 by 32 x 32768 product and one copy.

Exact up to float summation order. Plain ops only (a product, a permute, a reshape), so the same
form goes through ``torch.compile`` (inductor fuses the reshuffle with the bias) and ``torch.export``.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.conv_transpose import PatchConvTranspose
    >>> up = nn.ConvTranspose3d(8, 4, 2, stride=2)
    >>> x = torch.randn(2, 8, 3, 4, 5)
    >>> bool(torch.allclose(PatchConvTranspose.from_module(up)(x), up(x), atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["PatchConvTranspose", "is_patch_conv_transpose"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FUNCS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _tup(v: object, n: int) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * n  # type: ignore[arg-type]


def is_patch_conv_transpose(weight_shape: tuple[int, ...], stride: object, padding: object = 0,
                            output_padding: object = 0, groups: int = 1, dilation: object = 1) -> bool:
    """A transposed conv that :class:`PatchConvTranspose` computes: stride = kernel, no padding,
    output padding or dilation, one group."""
    n = len(weight_shape) - 2
    if n < 1:
        return False
    k = tuple(weight_shape[2:])
    return (groups == 1 and _tup(stride, n) == k and not any(_tup(padding, n)) and not any(_tup(output_padding, n))
            and all(d == 1 for d in _tup(dilation, n)))


@torch.fx.wrap
def _patch_conv_transpose(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    dims = weight.dim() - 2
    k = tuple(weight.shape[2:])
    if x.dim() != weight.dim():
        return _FUNCS[dims - 1](x, weight, bias, stride=k)
    n, cin, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    cout = weight.shape[1]
    w2 = weight.reshape(cin, -1).t()  # (C_out * prod(k), C_in)
    cols = x.reshape(n, cin, -1)
    eager_single = not torch.compiler.is_compiling() and not is_fake(x) and n == 1
    y = torch.mm(w2, cols[0]).unsqueeze(0) if eager_single else torch.matmul(w2, cols)
    y = y.reshape(n, cout, *k, *spatial)
    # (n, C_out, k1..kd, s1..sd) -> (n, C_out, s1, k1, ..., sd, kd)
    order = [0, 1] + [j for i in range(dims) for j in (2 + dims + i, 2 + i)]
    out = y.permute(order).reshape(n, cout, *(s * kk for s, kk in zip(spatial, k)))
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * dims)) if torch.compiler.is_compiling() else out.add_(
            bias.reshape(1, -1, *([1] * dims)))
    return out


class PatchConvTranspose(nn.Module):
    """``conv_transpose`` with ``stride == kernel_size`` as a matrix product and a reshuffle."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__()
        if weight.dim() < 3:
            raise ValueError(f"PatchConvTranspose: expected a weight (C_in, C_out, *kernel), got {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @classmethod
    def from_module(cls, conv: nn.Module) -> "PatchConvTranspose":
        """The same map as a ``nn.ConvTranspose{1,2,3}d`` that :func:`is_patch_conv_transpose` accepts."""
        if not (isinstance(conv, _TRANSPOSED) and conv.padding_mode == "zeros" and is_patch_conv_transpose(
                tuple(conv.weight.shape), conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)):
            raise ValueError(f"PatchConvTranspose.from_module: expected stride == kernel_size, no padding, "
                             f"one group; got {conv}")
        return cls(conv.weight, conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return _patch_conv_transpose(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weight
        return f"{w.shape[0]}, {w.shape[1]}, kernel_size={tuple(w.shape[2:])}, bias={self.bias is not None}"
