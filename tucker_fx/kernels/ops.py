"""Our CPU kernels as custom ops, so that ``torch.compile`` keeps them instead of undoing them.

Under ``torch.compile`` a kernel module that falls back to the plain op hands inductor a conv or a
pool that inductor lowers to the same slow ATen call the kernel was there to avoid: measured on the
2-core CPU (one thread), MONAI ResNet-10 compressed at rank 0.25 ran 167 ms eager and 256 ms through
inductor. As custom ops (:func:`torch.library.custom_op`) they are opaque calls in the compiled
graph: inductor schedules them as extern kernels and fuses what is around them. Under
``torch.export`` the kernels still emit the plain op (an exported program must load without
tucker_fx).

Both ops have a fake implementation (shapes for tracing) and autograd (the ATen backward of the op
they compute), so compiled training works too.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from tucker_fx.kernels import ops
    >>> x, w = torch.randn(1, 4, 6, 6, 6), torch.randn(8, 4, 3, 3, 3)
    >>> y = torch.ops.tucker_fx.mkldnn_conv(x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
    >>> bool(torch.allclose(y, F.conv3d(x, w, padding=1), atol=1e-5))
    True
    >>> torch.equal(torch.ops.tucker_fx.max_pool3d_cl(x, [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], False),
    ...             F.max_pool3d(x, 3, 2, 1))
    True
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mkldnn_conv", "narrow_conv3d", "max_pool3d_cl"]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


@torch.library.custom_op("tucker_fx::mkldnn_conv", mutates_args=())
def mkldnn_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> Tensor:
    """``torch.mkldnn_convolution`` (a conv run by mkldnn's direct kernels, whatever ATen's heuristic)."""
    return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, padding, stride, dilation, groups)


@mkldnn_conv.register_fake
def _mkldnn_conv_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int) -> Tensor:
    return _CONV[weight.dim()](x.contiguous(), weight, bias, stride, padding, dilation, groups)


def _conv_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation, groups, bias is not None)


def _conv_backward(ctx: Any, grad: Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups, has_bias = ctx.geometry
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad.contiguous(), x.contiguous(), weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
        False, [0] * len(stride), groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias])
    return gx, gw, (gb if has_bias else None), None, None, None, None


mkldnn_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


@torch.library.custom_op("tucker_fx::narrow_conv3d", mutates_args=())
def narrow_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 3x3x3 conv, stride 1, padding 1, on the native kernel (:mod:`tucker_fx.kernels.native`)
    where it runs, else on mkldnn."""
    from tucker_fx.kernels import native

    if native.available() and x.dtype == torch.float32:
        return native.narrow_conv3d(x, weight, bias)
    return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)


@narrow_conv3d.register_fake
def _narrow_conv3d_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.conv3d(x.contiguous(), weight, bias, 1, 1)


def _narrow_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias = inputs
    _conv_setup(ctx, (x, weight, bias, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1), output)


def _narrow_backward(ctx: Any, grad: Tensor) -> tuple:
    return _conv_backward(ctx, grad)[:3]


narrow_conv3d.register_autograd(_narrow_backward, setup_context=_narrow_setup)


@torch.library.custom_op("tucker_fx::max_pool3d_cl", mutates_args=())
def max_pool3d_cl(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                  ceil_mode: bool) -> Tensor:
    """``F.max_pool3d`` computed on channels_last_3d data; the result is contiguous."""
    y = F.max_pool3d(x.contiguous(memory_format=torch.channels_last_3d), kernel_size, stride, padding, dilation,
                     ceil_mode)
    return y.contiguous()


@max_pool3d_cl.register_fake
def _max_pool3d_cl_fake(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                        dilation: list[int], ceil_mode: bool) -> Tensor:
    return F.max_pool3d(x, kernel_size, stride, padding, dilation, ceil_mode).contiguous()


def _pool_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, kernel_size, stride, padding, dilation, ceil_mode = inputs
    ctx.save_for_backward(x)
    ctx.geometry = (kernel_size, stride, padding, dilation, ceil_mode)


def _pool_backward(ctx: Any, grad: Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    kernel_size, stride, padding, dilation, ceil_mode = ctx.geometry
    _, indices = torch.ops.aten.max_pool3d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    gx = torch.ops.aten.max_pool3d_with_indices_backward(grad.contiguous(), x, kernel_size, stride, padding, dilation,
                                                         ceil_mode, indices)
    return gx, None, None, None, None, None


max_pool3d_cl.register_autograd(_pool_backward, setup_context=_pool_setup)
