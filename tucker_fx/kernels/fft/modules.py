"""The FFT convolution modules: :class:`FFTConv` and the fused Tucker-2 :class:`TuckerFFTConv`.

Both hold their weights as Parameters (the kernel-spectrum cache and the work buffers are
keyed on them) and run :func:`~tucker_fx.kernels.fft.functional._fft_block` through one
``torch.fx``-wrapped call; :class:`_FFTBlockModule` holds what they share.

>>> conv = nn.Conv1d(2, 3, 9, padding=4)
>>> x = torch.randn(1, 2, 40)
>>> bool((FFTConv.from_conv(conv)(x) - conv(x)).abs().max() < 1e-5)
True
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.fx
from torch import Tensor, nn

from .functional import _fft_block
from .geometry import _check_mode_and_padding, _IntOrTuple, _normalize, _Padding, _tuple

__all__ = ["FFTConv", "TuckerFFTConv"]


@torch.fx.wrap
def _fft_block_cached(
    x: Tensor,
    first: Optional[Tensor],
    core: Tensor,
    last: Optional[Tensor],
    bias: Optional[Tensor],
    stride: tuple[int, ...],
    padding: Union[tuple[int, ...], str],
    dilation: tuple[int, ...],
    padding_mode: str,
    mix_last_in_frequency: bool,
    reuse_buffers: bool,
) -> Tensor:
    """:func:`_fft_block` with the spectrum cache on: the modules' one call.

    A leaf for torch.fx.symbolic_trace: modules outside torch.nn are traced through, and the
    shape-dependent planning here cannot run on Proxies. The traced graph gets one
    call_function node with the parameters as get_attr inputs (and keeps the cache: it is
    keyed on those Parameter objects). ``torch.fx.wrap`` patches this module's global during
    tracing, so the modules must call it from here.
    """
    return _fft_block(
        x, first, core, last, bias, stride, padding, dilation, padding_mode,
        mix_last_in_frequency, True, reuse_buffers,
    )


class _FFTBlockModule(nn.Module):
    """What the FFT modules share: the conv geometry, its checks and repr, and the block call."""

    stride: tuple[int, ...]
    padding: Union[tuple[int, ...], str]
    dilation: tuple[int, ...]
    padding_mode: str
    reuse_buffers: bool

    @staticmethod
    def _spatial_dims(kernel: Tensor, layout: str) -> int:
        """The kernel's number of spatial dims (1-3), else a ValueError naming ``layout``."""
        n = kernel.dim() - 2
        if n not in (1, 2, 3):
            raise ValueError(f"{layout} with 1-3 spatial dims, got {tuple(kernel.shape)}")
        return n

    def _set_geometry(
        self,
        kernel: Tensor,
        stride: _IntOrTuple,
        padding: _Padding,
        dilation: _IntOrTuple,
        padding_mode: str,
        reuse_buffers: bool,
    ) -> None:
        """Store the conv geometry of ``kernel`` (C_out, C_in, *k) per spatial dim; check it."""
        n = kernel.dim() - 2
        self.stride = _tuple(stride, n, "stride")
        self.padding = _check_mode_and_padding(n, padding, padding_mode)
        self.dilation = _tuple(dilation, n, "dilation")
        self.padding_mode = padding_mode
        self.reuse_buffers = bool(reuse_buffers)
        _normalize(n, tuple(kernel.shape[2:]), self.stride, self.padding, self.dilation, padding_mode)

    def _run(
        self,
        x: Tensor,
        first: Optional[Tensor],
        core: Tensor,
        last: Optional[Tensor],
        mix_last_in_frequency: bool,
    ) -> Tensor:
        return _fft_block_cached(
            x, first, core, last, self.bias, self.stride, self.padding, self.dilation,
            self.padding_mode, mix_last_in_frequency, self.reuse_buffers,
        )

    def _geometry_repr(self) -> str:
        s = f"stride={self.stride}, padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


class FFTConv(_FFTBlockModule):
    """A Conv1d/2d/3d (groups=1) evaluated by FFT, with the kernel spectrum cached.

    Fast when the kernel is large and the channels are few (a Tucker core); slow for 3x3
    kernels with many channels -- choose by timing. The spectrum is cached per (input spatial
    shape, device, dtype) and recomputed when the weight changes in place or is replaced.
    ``reuse_buffers`` (default on) keeps per-module work buffers for calls without autograd
    on CPU (see the module docstring); turn it off to trade speed for memory.
    ``torch.fx.symbolic_trace`` records the forward as one ``call_function`` node.

    >>> conv = nn.Conv3d(2, 2, (5, 11, 11), padding=(2, 5, 5))
    >>> m = FFTConv.from_conv(conv)
    >>> x = torch.randn(1, 2, 8, 24, 32)
    >>> bool((m(x) - conv(x)).norm() / conv(x).norm() < 1e-5)
    True
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        stride: _IntOrTuple = 1,
        padding: _Padding = 0,
        dilation: _IntOrTuple = 1,
        padding_mode: str = "zeros",
        reuse_buffers: bool = True,
    ) -> None:
        super().__init__()
        self._spatial_dims(weight, "weight must be (C_out, C_in, *k)")
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach().clone())
        )
        self._set_geometry(weight, stride, padding, dilation, padding_mode, reuse_buffers)

    @classmethod
    def from_conv(cls, conv: Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]) -> "FFTConv":
        """Copy ``conv``'s weight, bias and geometry (groups must be 1, not transposed)."""
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"expected nn.Conv1d/2d/3d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"FFTConv supports groups=1 only, got groups={conv.groups}")
        return cls(
            conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.padding_mode
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None, self.weight, None, False)

    def extra_repr(self) -> str:
        c_out, c_in, *k = self.weight.shape
        return (f"{c_in}, {c_out}, kernel_size={tuple(k)}, {self._geometry_repr()}, "
                f"bias={self.bias is not None}")


class TuckerFFTConv(_FFTBlockModule):
    """Tucker-2 conv block with its core run by FFT: x -> first -> core (FFT) -> last (+bias).

    ``first`` (R_s, S) mixes channels before the core (= U_s^T), ``core`` (R_t, R_s, *k) is the
    core conv with the original stride/padding/dilation/padding_mode, ``last`` (T, R_t) mixes
    after it (= U_t) and ``bias`` (T,) is the original bias. Only R_s channels are transformed
    forward and R_t channels back. ``first=None`` gives Tucker-1 (core S -> R, then last);
    ``last=None`` ends at the core (the bias then has R_t entries).

    ``mix_last_in_frequency=True`` folds ``last`` into the per-frequency matrix (R_s -> T) and
    transforms T channels back instead of R_t: cheaper only when T is not much larger than R_t.
    The caller picks by timing. ``reuse_buffers`` as in :class:`FFTConv`.

    Equals ``conv(conv(conv(x, first[..., None..]), core, ...), last[..., None..], bias)``
    (non-'zeros' padding is applied after ``first``: a channel mix commutes with it).

    >>> import torch.nn.functional as F
    >>> first, core, last = torch.randn(2, 4), torch.randn(2, 2, 5, 11, 11), torch.randn(6, 2)
    >>> m = TuckerFFTConv(first, core, last, torch.zeros(6), padding=(2, 5, 5))
    >>> x = torch.randn(1, 4, 8, 24, 32)
    >>> y = F.conv3d(F.conv3d(x, first[..., None, None, None]), core, padding=(2, 5, 5))
    >>> ref = F.conv3d(y, last[..., None, None, None])
    >>> bool((m(x) - ref).norm() / ref.norm() < 1e-5)
    True
    """

    def __init__(
        self,
        first: Optional[Tensor],
        core: Tensor,
        last: Optional[Tensor],
        bias: Optional[Tensor] = None,
        stride: _IntOrTuple = 1,
        padding: _Padding = 0,
        dilation: _IntOrTuple = 1,
        padding_mode: str = "zeros",
        mix_last_in_frequency: bool = False,
        reuse_buffers: bool = True,
    ) -> None:
        super().__init__()
        self._spatial_dims(core, "core must be (R_t, R_s, *k)")
        first = _as_matrix(first, "first")
        last = _as_matrix(last, "last")
        if first is not None and first.shape[0] != core.shape[1]:
            raise ValueError(f"first must be (R_s={core.shape[1]}, S), got {tuple(first.shape)}")
        if last is not None and last.shape[1] != core.shape[0]:
            raise ValueError(f"last must be (T, R_t={core.shape[0]}), got {tuple(last.shape)}")
        n_out = last.shape[0] if last is not None else core.shape[0]
        if bias is not None and tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        opt = lambda t: None if t is None else nn.Parameter(t.detach().clone())  # noqa: E731
        self.register_parameter("first", opt(first))
        self.core = nn.Parameter(core.detach().clone())
        self.register_parameter("last", opt(last))
        self.register_parameter("bias", opt(bias))
        self.mix_last_in_frequency = bool(mix_last_in_frequency)
        self._set_geometry(core, stride, padding, dilation, padding_mode, reuse_buffers)

    @property
    def in_channels(self) -> int:
        return self.first.shape[1] if self.first is not None else self.core.shape[1]

    @property
    def out_channels(self) -> int:
        return self.last.shape[0] if self.last is not None else self.core.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, self.first, self.core, self.last, self.mix_last_in_frequency)

    def extra_repr(self) -> str:
        r_t, r_s, *k = self.core.shape
        s = (
            f"{self.in_channels} -> {r_s} -> {r_t} -> {self.out_channels}, kernel_size={tuple(k)}, "
            f"{self._geometry_repr()}"
        )
        if self.first is None:
            s += ", first=None"
        if self.last is None:
            s += ", last=None"
        if self.mix_last_in_frequency:
            s += ", mix_last_in_frequency=True"
        return s + f", bias={self.bias is not None}"


def _as_matrix(m: Optional[Tensor], name: str) -> Optional[Tensor]:
    """Accept (O, I) or a 1x1(x1) conv weight (O, I, 1, ...)."""
    if m is None:
        return None
    if m.dim() > 2 and all(s == 1 for s in m.shape[2:]):
        m = m.reshape(m.shape[0], m.shape[1])
    if m.dim() != 2:
        raise ValueError(
            f"{name} must be a matrix (out, in) or a 1x1 conv weight, got {tuple(m.shape)}"
        )
    return m
