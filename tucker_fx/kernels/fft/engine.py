"""The CPU engine of the FFT block: channel mixes, and the no-autograd path with reused,
chunked work buffers.

>>> x, m = torch.randn(2, 4, 6, 6), torch.randn(3, 4)
>>> bool(torch.allclose(_channel_mix(x, m, None), torch.einsum("os,bs...->bo...", m, x), atol=1e-5))
True
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .geometry import _Plan
from .spectra import _stamp

__all__: list[str] = []  # internals of tucker_fx.kernels.fft


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _channel_mix(x: Tensor, m: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y[b, o, ...] = sum_i m[o, i] x[b, i, ...] (+ bias[o]), over any spatial dims."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    if x.is_contiguous():
        # oneDNN's 1x1 conv: ~2x faster than MKL's gemm for these very flat (2 x 4) mixes
        return _CONV[len(spatial)](x, m.reshape(*m.shape, *([1] * len(spatial))), bias)
    # a strided crop of the inverse transform: one copy (reshape) feeding a fused gemm + bias
    x3 = x.reshape(b, c, -1)
    if bias is None:
        y = torch.matmul(m, x3)
    elif not torch.compiler.is_compiling() and b == 1:  # eager only: no guard on a dynamic batch
        y = torch.addmm(bias.unsqueeze(-1), m, x3[0]).unsqueeze(0)
    else:
        y = torch.baddbmm(bias.view(1, -1, 1), m.expand(b, -1, -1), x3)
    return y.view(b, m.shape[0], *spatial)


# ---------------------------------------------------------------------------------------------
# No-autograd CPU path with reused work buffers
# ---------------------------------------------------------------------------------------------
#
# On CPU, fresh multi-megabyte tensors come from mmap / a trimmed heap and are paid for in page
# faults on first touch: measured here at 1.5-3.5 us per 4 KiB page, i.e. as much as the FFTs
# themselves for the paper's first layer (8k faults, +10 ms per call at batch 1; 250k faults,
# +300 ms at batch 8). Without autograd this path (a) keeps its zero-padded FFT input, the
# spectral-mix output and the crop in per-module buffers (the padding region is zeroed once),
# (b) runs the batch in chunks of at most _CHUNK_BYTES of FFT input so that the temporaries the
# FFTs allocate stay small enough to be recycled by the allocator, and (c) writes each chunk's
# result straight into the output. Only the output and the FFTs' own results are allocated.

_CHUNK_BYTES = 8 << 20
_BUFFER_MIN_BYTES = 1 << 20  # below this, allocation is cheap and the plain path has less overhead
_WORKSPACES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MAX_WORKSPACES_PER_OWNER = 2
# Channel mixes with up to this many coefficients, on channels of at least this many elements,
# run as axpy passes straight into the padded FFT input (below: a 1x1 conv and a copy).
_LOOP_MIX_MAX_PRODUCT = 32
_LOOP_MIX_MIN_NUMEL = 1 << 16


def _use_buffers(
    x: Tensor, core: Tensor, c_mid: int, plan: _Plan, grad_inputs: tuple[Optional[Tensor], ...]
) -> bool:
    """Whether the block runs on reused buffers: eager, CPU, big enough, real tensors, no autograd.

    Under torch.compile / torch.export nothing here may branch on the batch size: checked
    first, so that the size test is never traced (it would guard, i.e. specialise, a dynamic
    batch). The buffered path is eager-only anyway.
    """
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.shape[0] * c_mid * math.prod(plan.fft_shape) * x.element_size() >= _BUFFER_MIN_BYTES
        and _stamp((x, core)) is not None  # real tensors (not fake / functional / inference)
        and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in grad_inputs))
    )


def _workspace(owner: Tensor, key: tuple, specs: dict) -> dict:
    """Per-owner buffers, made on first use. ``specs``: name -> (shape, dtype, zero-filled)."""
    key = key + (threading.get_ident(), torch.is_inference_mode_enabled())
    spaces = _WORKSPACES.get(owner)
    if spaces is None:
        spaces = {}
        _WORKSPACES[owner] = spaces
    ws = spaces.get(key)
    if ws is None:
        while len(spaces) >= _MAX_WORKSPACES_PER_OWNER:
            spaces.pop(next(iter(spaces)))
        ws = {
            name: (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=owner.device)
            for name, (shape, dtype, zero) in specs.items()
        }
        spaces[key] = ws
    return ws


def _mix_into(out: Tensor, x: Tensor, m: Tensor) -> None:
    """out[:, o] = sum_i m[o, i] x[:, i] for a strided ``out`` (no autograd)."""
    c_out, c_in = m.shape
    if c_out * c_in <= _LOOP_MIX_MAX_PRODUCT and x[:, 0].numel() >= _LOOP_MIX_MIN_NUMEL:
        coef = m.tolist()
        for o in range(c_out):
            dst = out[:, o]
            torch.mul(x[:, 0], coef[o][0], out=dst)
            for i in range(1, c_in):
                dst.add_(x[:, i], alpha=coef[o][i])
    else:
        out.copy_(_channel_mix(x.contiguous(), m, None))


def _run_buffered(
    x: Tensor,
    first: Optional[Tensor],
    w_hat: Tensor,
    c_mid: int,
    last: Optional[Tensor],
    bias: Optional[Tensor],
    plan: _Plan,
    owner: Tensor,
) -> Tensor:
    """The block without autograd on ``owner``'s work buffers, ``_CHUNK_BYTES`` of FFT input
    at a time: [mix ``first``] -> rfftn -> mix with ``w_hat`` -> irfftn -> crop -> [mix ``last``]."""
    n = len(plan.fft_shape)
    dims = tuple(range(-n, 0))
    batch = x.shape[0]
    c_fft = first.shape[0] if first is not None else x.shape[1]
    n_out = last.shape[0] if last is not None else c_mid
    dtype = x.dtype
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    freq = (*plan.fft_shape[:-1], plan.fft_shape[-1] // 2 + 1)
    per_sample = c_fft * math.prod(plan.fft_shape) * x.element_size()
    chunk = max(1, min(batch, _CHUNK_BYTES // max(per_sample, 1)))
    out = x.new_empty(batch, n_out, *plan.out_shape)
    crop_index = (slice(None), slice(None)) + tuple(
        slice(0, (o - 1) * s + 1, s) for o, s in zip(plan.out_shape, plan.stride)
    )
    in_index = (slice(None), slice(None)) + tuple(slice(0, size) for size in plan.in_shape)
    for start in range(0, batch, chunk):
        xb = x[start : start + chunk]
        b = xb.shape[0]
        specs = {
            "pad": ((b, c_fft, *plan.fft_shape), dtype, True),
            "mix": ((b, c_mid, *freq), cdtype, False),
        }
        if last is not None:
            specs["crop"] = ((b, c_mid, *plan.out_shape), dtype, False)
        ws = _workspace(owner, (plan, b, c_fft, c_mid, last is not None, dtype, x.device), specs)

        # 1. channel mix S -> R_s (and the non-'zeros' padding) into the zero-padded FFT input
        pad = ws["pad"]
        interior = pad[in_index]
        if plan.pre_pad is not None:
            src = xb if first is None else _channel_mix(xb, first, None)
            interior.copy_(F.pad(src, plan.pre_pad, mode=plan.padding_mode)[in_index])
        else:
            src = xb[in_index]
            if first is None:
                interior.copy_(src)
            else:
                _mix_into(interior, src, first)

        # 2-4. rfftn, per-frequency channel mix, irfftn
        x_hat = torch.fft.rfftn(pad, dim=dims)
        y_hat = ws["mix"]
        torch.mul(x_hat[:, 0:1], w_hat[:, 0], out=y_hat)
        for i in range(1, c_fft):
            y_hat.addcmul_(x_hat[:, i : i + 1], w_hat[:, i])
        del x_hat
        crop = torch.fft.irfftn(y_hat, s=plan.fft_shape, dim=dims)[crop_index]

        # 5. crop/stride, channel mix R_t -> T (+ bias), straight into the output
        ob = out[start : start + b]
        if last is not None:
            cb = ws["crop"]
            cb.copy_(crop)
            c3, o3 = cb.view(b, c_mid, -1), ob.view(b, n_out, -1)
            if b == 1:
                if bias is None:
                    torch.mm(last, c3[0], out=o3[0])
                else:
                    torch.addmm(bias.unsqueeze(-1), last, c3[0], out=o3[0])
            elif bias is None:
                torch.bmm(last.expand(b, -1, -1), c3, out=o3)
            else:
                torch.baddbmm(bias.view(1, -1, 1), last.expand(b, -1, -1), c3, out=o3)
        elif bias is not None:
            torch.add(crop, bias.view(-1, *([1] * n)), out=ob)
        else:
            ob.copy_(crop)
    return out

