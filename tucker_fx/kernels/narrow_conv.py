"""A module for narrow 3x3x3 convs that runs them on the native kernel where it can.

:class:`NarrowConv3d` computes exactly what its ``nn.Conv3d`` did (stride 1, padding 1, one
group, float32 on the CPU) with :func:`tucker_fx.kernels.native.narrow_conv3d`, which ran the
4 -> 4 core of a 16-channel layer at rank 0.25 (64^3, one thread) in 3.6 ms against 13.9 ms on
oneDNN (11.9 on channels-last data). Anything else (no native library here, other dtypes or
devices, channels-last input, fake tensors) takes :class:`~tucker_fx.kernels.pointwise.MkldnnConv`'s
path. Under ``torch.compile`` it is the opaque op ``torch.ops.tucker_fx.narrow_conv3d``; under
``torch.export`` a plain conv (an exported program must load without tucker_fx).

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.narrow_conv import NarrowConv3d, narrow_eligible
    >>> conv = nn.Conv3d(4, 4, 3, padding=1)
    >>> narrow_eligible(conv)
    True
    >>> x = torch.randn(1, 4, 6, 7, 20)
    >>> bool(torch.allclose(NarrowConv3d(conv)(x), conv(x), atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from tucker_fx.kernels import native
from tucker_fx.kernels.pointwise import MkldnnConv, _mkldnn_conv, mkldnn_eligible

__all__ = ["NarrowConv3d", "narrow_eligible", "NARROW_CHANNELS"]

NARROW_CHANNELS = 4
"""A conv is narrow when its input or output has at most this many channels (or both at most twice
as many). Measured (64^3, one thread, native / oneDNN / oneDNN on channels-last data, ms): 1 -> 4
1.2 / 4.5 / 4.5, 4 -> 4 3.6 / 13.9 / 11.9, 8 -> 4 6.1 / 25.2 / 14.4, 16 -> 4 18.8 / 53.3 / 38.3,
4 -> 16 16.8 / 19.7 / 17.8, 8 -> 8 17.2 / 27.4 / 18.5 (at 32^3: 1.80 / 3.62 / 1.72)."""


def narrow_eligible(conv: nn.Module) -> bool:
    """A ``Conv3d`` with a 3x3x3 kernel, stride 1, zero padding 1, no dilation, one group, and few
    channels (:data:`NARROW_CHANNELS`)."""
    if not (isinstance(conv, (nn.Conv3d, MkldnnConv)) and mkldnn_eligible(conv) and conv.weight.dim() == 5):
        return False
    if not (tuple(conv.weight.shape[2:]) == (3, 3, 3) and tuple(conv.stride) == (1, 1, 1)
            and tuple(conv.padding) == (1, 1, 1) and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1):
        return False
    o, c = conv.weight.shape[:2]
    return min(o, c) <= NARROW_CHANNELS or max(o, c) <= 2 * NARROW_CHANNELS


@torch.fx.wrap
def _narrow_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if torch.compiler.is_compiling():
        if not torch.compiler.is_exporting() and x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.tucker_fx.narrow_conv3d(x, weight, bias)
    elif (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5 and x.is_contiguous()
          and not is_fake(x) and not torch.jit.is_tracing() and native.available()):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return torch.ops.tucker_fx.narrow_conv3d(x, weight, bias)  # the op has a backward
        return native.narrow_conv3d(x, weight, bias)
    return _mkldnn_conv(x, weight, bias, (1, 1, 1), (1, 1, 1), (1, 1, 1), 1)


class NarrowConv3d(MkldnnConv):
    """A narrow 3x3x3 conv (:func:`narrow_eligible`) on the native kernel, else on mkldnn."""

    def __init__(self, conv: nn.Module) -> None:
        if not narrow_eligible(conv):
            raise ValueError("NarrowConv3d: expected a 3x3x3 Conv3d with stride 1, zero padding 1, no dilation, "
                             f"one group and at most {NARROW_CHANNELS} channels on a side, got {conv}")
        super().__init__(conv)

    def forward(self, x: Tensor) -> Tensor:
        return _narrow_conv(x, self.weight, self.bias)
