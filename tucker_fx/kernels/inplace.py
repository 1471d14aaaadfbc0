"""Norms and adds that write into their input's buffer, when nothing else can see that buffer.

On the CPU, glibc serves every allocation of 32 MB or more with a fresh ``mmap``: each call of the
model pays a page fault per 4 kB page of every such tensor (a 1 x 32 x 64^3 fp32 map is 33.5 MB).
In a U-Net at 64^3 the full-width maps that a decomposition does not touch (the norms and the
residual adds) are such tensors. Measured on this project's 2-core CPU (one thread): an
InstanceNorm of 1 x 32 x 64^3 took 36.6 ms out of place and 20.4 ms in place.

:class:`InplaceInstanceNorm` normalises in place (ATen's ``native_batch_norm.out`` with the input as
the output: the kernel computes the statistics before it writes), and :func:`add_into` adds into its
first operand. GroupNorm is left out: ATen's ``native_group_norm.out`` measured slower in place than
out of place at every size tried (16 x 64^3: 2.4 -> 5.8 ms; 32 x 64^3: 10.8 -> 14.4 ms). The
pass ``passes.inplace`` uses them only where the input is a buffer that one node made and only this
node reads. Each falls back to the ordinary out-of-place op where in place could be seen or is not
allowed: autograd recording (an input that requires grad), ``torch.compile``/``torch.export`` (which
want functional ops, and fuse on their own), fake tensors, other devices and dtypes, layouts other
than contiguous, and shapes that broadcast.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.inplace import InplaceInstanceNorm
    >>> norm = nn.InstanceNorm3d(4, affine=True)
    >>> x = torch.randn(1, 4, 3, 5, 5)
    >>> ref = norm(x)
    >>> with torch.no_grad():  # in place only where autograd records nothing
    ...     out = InplaceInstanceNorm(norm)(x)
    >>> bool(torch.allclose(out, ref, atol=1e-5)), out.data_ptr() == x.data_ptr()
    (True, True)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["InplaceInstanceNorm", "add_into", "inplace_norm_eligible"]

_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def inplace_norm_eligible(module: nn.Module) -> bool:
    """A norm that :class:`InplaceInstanceNorm` computes exactly in eval mode: an InstanceNorm that
    normalises by the input's own statistics (no running statistics)."""
    return isinstance(module, _INSTANCE) and not module.track_running_stats


def _may_write(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Writing into ``x`` cannot be seen: eager, on the CPU, float, contiguous, no autograd recording."""
    if torch.compiler.is_compiling() or is_fake(x) or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if not x.is_contiguous():
        return False
    grad = torch.is_grad_enabled() and (x.requires_grad or any(o is not None and o.requires_grad for o in others))
    return not grad


class InplaceInstanceNorm(nn.Module):
    """An InstanceNorm (no running statistics) that normalises its input in place where it may."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        if not isinstance(norm, _INSTANCE) or norm.track_running_stats:
            raise ValueError(f"InplaceInstanceNorm: expected an InstanceNorm without running statistics, got {norm}")
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = float(norm.eps)
        self.num_features = norm.num_features

    def forward(self, x: Tensor) -> Tensor:
        if not _may_write(x, self.weight, self.bias) or x.dim() < 3:
            return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        n, c = x.shape[0], x.shape[1]
        view = x.view(1, n * c, *x.shape[2:])
        w = self.weight.repeat(n) if self.weight is not None and n > 1 else self.weight
        b = self.bias.repeat(n) if self.bias is not None and n > 1 else self.bias
        save_mean, save_invstd = x.new_empty(0), x.new_empty(0)
        torch.ops.aten.native_batch_norm.out(view, w, b, None, None, True, 0.0, self.eps, out=view,
                                             save_mean=save_mean, save_invstd=save_invstd)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}, in place"


@torch.fx.wrap
def add_into(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``, written into ``a`` where it may (same shape and dtype as the result, see the module
    docstring).

    Example:
        >>> import torch
        >>> a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
        >>> out = add_into(a, b)
        >>> out.data_ptr() == a.data_ptr(), float(out.sum())
        (True, 18.0)
    """
    if (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and b.device == a.device and _may_write(a, b)):
        return a.add_(b)
    return a + b
