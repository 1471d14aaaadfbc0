"""Convolution by FFT, and the fused Tucker-2 block that runs its core by FFT.

A direct convolution kernel vectorises over channels; a Tucker core with two or three
channels and a large kernel (the paper's first layer: 2 -> 2 channels, kernel (5, 11, 11))
wastes the machine. Its cost by FFT does not depend on the kernel volume at all:

    rfftn(input) -> per-frequency (C_out x C_in) channel mix -> irfftn -> crop / stride

Everything here is plain torch (no FX, no compiled extension), differentiable, and has the
exact semantics of ``F.conv1d/2d/3d`` (cross-correlation, ``groups=1``), including
``padding='same'`` with even kernels, anisotropic stride/dilation and the four padding modes
of ``nn.ConvNd``.

Public API
----------
- :func:`fft_conv` -- functional, same arguments as ``F.conv{1,2,3}d`` plus ``padding_mode``.
- :class:`FFTConv` -- module holding weight/bias that caches the kernel spectrum;
  ``FFTConv.from_conv(conv)``.
- :class:`TuckerFFTConv` -- channel mix S->R_s, FFT core R_s->R_t, channel mix R_t->T (+bias),
  transforming only the R_s channels forward and the R_t (or T) channels back.
- :func:`fft_size` -- the FFT size per spatial dim that a given convolution uses.
- :func:`next_fast_len` -- the FFT length rule (2-3-5-7 smooth).
- :func:`clear_fft_cache` -- drop cached kernel spectra and work buffers.

How: zero padding is not materialised -- the left padding is folded into the kernel's
spectrum as a circular shift and the right padding is the FFT's own zero extension, so the
FFT length per dim is the smallest fast size >= input + max(left, right) pad (and input
samples no kept output reads are cropped away, which matters with stride). Only the kept
region of the circular correlation is read, so wrap-around elsewhere is harmless. Stride is
computed densely and subsampled. Other padding modes pad the input first, as nn.ConvNd does.

Numerics: computed in the input's dtype (float32 or float64; float16/bfloat16 are computed in
float32 and cast back). The error is that of the transforms, ~1e-7 relative in float32 and
~1e-15 in float64 -- a different rounding from a direct conv, not an approximation.

Caching (modules only): the kernel spectrum depends on the weights and on the input's spatial
shape, device and dtype. It is cached per (shape, device, dtype) on the Parameter objects
themselves (weakly), so a module and a GraphModule traced from it share it. Each call
compares ``weight._version`` and ``weight.data_ptr()``, so in-place updates
(``optimizer.step()``, ``with torch.no_grad(): w.mul_(2)``, ``load_state_dict``) and
replacement invalidate it. Writes through ``weight.data`` bypass the version counter: call
:func:`clear_fft_cache` after those. With gradients enabled the cached spectrum is still used
forward and the weights' gradient re-derives the spectrum in the backward pass, so caching
never changes results or gradients.

Speed (modules, no autograd, CPU): fresh multi-megabyte tensors cost page faults on this
kind of machine (measured 1.5-3.5 us per 4 KiB page, as much as the FFTs themselves), so
without autograd the modules keep their padded FFT input and spectral-mix output in reused
per-module buffers and run large batches in chunks (``reuse_buffers=False`` turns this
off). Run inference under ``torch.no_grad()`` / ``torch.inference_mode()`` to get it; with
autograd the plain (allocating) path runs.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "fft_conv",
    "fft_size",
    "FFTConv",
    "TuckerFFTConv",
    "clear_fft_cache",
    "next_fast_len",
]

_IntOrTuple = Union[int, Sequence[int]]
_Padding = Union[int, Sequence[int], str]
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def next_fast_len(n: int, even: bool = False) -> int:
    """Smallest ``m >= n`` whose prime factors are all in {2, 3, 5, 7} (and even if asked).

    Measured here (MKL FFT, 2 cores): for the paper's first layer the smallest such sizes
    (30, 125, 168) beat the nearby powers of two and 2-3 smooth sizes.

    >>> next_fast_len(125), next_fast_len(125, even=True), next_fast_len(11)
    (125, 126, 12)
    """
    if n <= 1:
        return 2 if even else 1
    m = n
    while True:
        if not (even and m % 2):
            r = m
            for p in (2, 3, 5, 7):
                while r % p == 0:
                    r //= p
            if r == 1:
                return m
        m += 1


def _tuple(value: _IntOrTuple, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) == 1 and n > 1:
        out = out * n
    if len(out) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return out


def _normalize(
    n: int,
    kernel: Sequence[int],
    stride: _IntOrTuple,
    padding: _Padding,
    dilation: _IntOrTuple,
    padding_mode: str,
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Return (stride, ((left, right) per dim), dilation) for an n-d conv."""
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    stride_t = _tuple(stride, n, "stride")
    dilation_t = _tuple(dilation, n, "dilation")
    if any(s < 1 for s in stride_t):
        raise ValueError(f"stride must be positive, got {stride_t}")
    if any(d < 1 for d in dilation_t):
        raise ValueError(f"dilation must be positive, got {dilation_t}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = tuple((0, 0) for _ in range(n))
        elif padding == "same":
            if any(s != 1 for s in stride_t):
                raise ValueError("padding='same' is not supported for strided convolutions")
            # PyTorch's rule: total = d*(k-1), left = total // 2, the extra one on the right.
            pads = tuple(
                (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for k, d in zip(kernel, dilation_t)
            )
        else:
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    else:
        p = _tuple(padding, n, "padding")
        if any(v < 0 for v in p):
            raise ValueError(f"padding must be non-negative, got {p}")
        pads = tuple((v, v) for v in p)
    return stride_t, pads, dilation_t


@dataclass(frozen=True)
class _Plan:
    """How one convolution runs by FFT (all tuples are per spatial dim)."""

    pre_pad: Optional[tuple[int, ...]]  # F.pad argument (non-'zeros' modes), else None
    padding_mode: str
    in_shape: tuple[int, ...]  # spatial shape fed to the FFT (after pre-pad / crop)
    crop_input: bool  # narrow the input to in_shape before the FFT
    fft_shape: tuple[int, ...]
    shifts: tuple[int, ...]  # implicit left zero padding, folded into the kernel spectrum
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    out_shape: tuple[int, ...]
    stride: tuple[int, ...]


def _plan(
    in_shape: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
    dilation: tuple[int, ...],
    padding_mode: str,
) -> _Plan:
    n = len(in_shape)
    pre_pad = None
    if padding_mode != "zeros" and any(l or r for l, r in pads):
        # nn.ConvNd: F.pad(x, reversed pads, mode) then a conv with padding 0.
        pre_pad = tuple(v for lr in reversed(pads) for v in lr)
        in_shape = tuple(s + l + r for s, (l, r) in zip(in_shape, pads))
        pads = tuple((0, 0) for _ in range(n))
    fft_shape, used, shifts, out_shape = [], [], [], []
    crop = False
    for i, (size, k, s, (pl, pr), d) in enumerate(zip(in_shape, kernel, stride, pads, dilation)):
        k_eff = d * (k - 1) + 1
        full = size + pl + pr - k_eff + 1
        if full < 1:
            raise ValueError(
                f"kernel extent {k_eff} (kernel {k}, dilation {d}) is larger than the padded "
                f"input size {size + pl + pr} in spatial dim {i}"
            )
        out = (full - 1) // s + 1
        last = (out - 1) * s  # last output position computed
        # Input samples [0, size) at offset -pl; output n reads x[n - pl + j*d].
        need_in = max(1, min(size, last + k_eff - pl))  # samples that kept outputs read
        # Circular correlation of length L is exact on the kept outputs 0..last iff
        # L >= need_in + pl (no wrap on the left), L >= last + k_eff - pl (none on the right),
        # L > last (each kept output has its own index) and L >= k_eff (taps do not collide).
        length = max(need_in + pl, last + k_eff - pl, last + 1, k_eff)
        fast = next_fast_len(length, even=(i == n - 1))
        if fast < size + pl:  # the FFT would wrap unused trailing samples in: crop them
            crop = True
        else:
            need_in = size
        fft_shape.append(fast)
        used.append(need_in)
        shifts.append(pl)
        out_shape.append(out)
    return _Plan(
        pre_pad=pre_pad,
        padding_mode=padding_mode,
        in_shape=tuple(used),
        crop_input=crop,
        fft_shape=tuple(fft_shape),
        shifts=tuple(shifts),
        kernel=kernel,
        dilation=dilation,
        out_shape=tuple(out_shape),
        stride=stride,
    )


_plan_cached = functools.lru_cache(maxsize=4096)(_plan)


def fft_size(
    input_shape: Sequence[int],
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
    padding_mode: str = "zeros",
) -> tuple[int, ...]:
    """FFT size per spatial dim used for a conv of ``kernel_size`` over spatial ``input_shape``.

    Zero padding costs nothing extra (it is folded into the kernel's spectrum); other padding
    modes pad the input first.

    >>> fft_size((28, 120, 160), (5, 11, 11), padding=(2, 5, 5))
    (30, 125, 168)
    """
    shape = tuple(int(s) for s in input_shape)
    k = _tuple(kernel_size, len(shape), "kernel_size")
    s, pads, d = _normalize(len(shape), k, stride, padding, dilation, padding_mode)
    return _plan_cached(shape, k, s, pads, d, padding_mode).fft_shape


# ---------------------------------------------------------------------------------------------
# Spectra
# ---------------------------------------------------------------------------------------------


def _kernel_spectrum(weight: Tensor, plan: _Plan) -> Tensor:
    """The spectrum that turns a product with rfftn(input) into the cross-correlation.

    Equals ``conj(rfftn(w'))`` where w' is the dilated kernel placed circularly at offset
    ``-shift`` (the implicit left zero padding). For a real kernel the conjugate is the
    transform of the index-reversed sequence, so tap j simply goes to ``(shift - j*d) mod L``
    and no conjugation pass is needed. ``weight`` is (..., *kernel).

    (A pruned transform -- last dim first, each dim from its kernel extent -- was measured
    slower: the strided transforms along the leading dims and the final relayout cost more
    than one contiguous multi-dim r2c.)
    """
    n = len(plan.fft_shape)
    lead = weight.dim() - n
    z = weight.new_zeros(*weight.shape[:lead], *plan.fft_shape)
    index: list = [slice(None)] * lead
    for i in range(n):
        taps = torch.arange(plan.kernel[i], device=weight.device) * plan.dilation[i]
        shape = [1] * n
        shape[i] = plan.kernel[i]
        index.append(((plan.shifts[i] - taps) % plan.fft_shape[i]).view(shape))
    z[tuple(index)] = weight
    return torch.fft.rfftn(z, dim=tuple(range(-n, 0)))


def _spectral_mix(x_hat: Tensor, w_hat: Tensor) -> Tensor:
    """y[b, o, f] = sum_i x[b, i, f] * w[o, i, f] for complex x (B, C_in, *f), w (C_out, C_in, *f).

    C_in fused multiply-accumulate passes over the output. Measured against moving the
    frequencies to the batch dim of a matmul (complex bmm, or a real 2x2-block bmm): this wins
    at every size up to 32 x 32 channels at batch 1 and 8 (a complex bmm of these tiny
    per-frequency matrices is 2-6x slower); the real-block bmm only draws level near 64 x 64.
    In place is safe under autograd: addcmul saves its factors, not the accumulator.
    """
    y = x_hat[:, 0:1] * w_hat[:, 0]
    for i in range(1, x_hat.shape[1]):
        y = y.addcmul_(x_hat[:, i : i + 1], w_hat[:, i])
    return y


def _forward_spectrum(x: Tensor, plan: _Plan) -> Tensor:
    n = len(plan.fft_shape)
    if plan.pre_pad is not None:
        x = F.pad(x, plan.pre_pad, mode=plan.padding_mode)
    if plan.crop_input:
        for i, size in enumerate(plan.in_shape):
            x = x.narrow(x.dim() - n + i, 0, size)
    return torch.fft.rfftn(x, s=plan.fft_shape, dim=tuple(range(-n, 0)))


def _inverse_crop(y_hat: Tensor, plan: _Plan) -> Tensor:
    n = len(plan.fft_shape)
    y = torch.fft.irfftn(y_hat, s=plan.fft_shape, dim=tuple(range(-n, 0)))
    index = [slice(None), slice(None)]
    for o, s in zip(plan.out_shape, plan.stride):
        index.append(slice(0, (o - 1) * s + 1, s))
    return y[tuple(index)]


def _make_plan(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: _IntOrTuple,
    padding: _Padding,
    dilation: _IntOrTuple,
    padding_mode: str,
) -> _Plan:
    n = len(kernel)
    s, pads, d = _normalize(n, kernel, stride, padding, dilation, padding_mode)
    # (Dynamo traces the uncached function: it warns about lru_cache wrappers.)
    plan = _plan if torch.compiler.is_compiling() else _plan_cached
    return plan(tuple(x.shape[-n:]), kernel, s, pads, d, padding_mode)


# ---------------------------------------------------------------------------------------------
# Kernel-spectrum cache
# ---------------------------------------------------------------------------------------------

# owner Parameter -> {key: (stamp, spectrum)}. Keyed weakly on the tensor object, so the cache
# lives exactly as long as the weight does and is shared by a module and any GraphModule traced
# from it (both hold the same Parameter objects).
_SPECTRUM_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MAX_ENTRIES_PER_OWNER = 4


def clear_fft_cache(module: Optional[nn.Module] = None) -> None:
    """Drop cached kernel spectra and work buffers: all of them, or those of ``module``.

    Needed only after writing weights through ``.data`` (which bypasses the version counter
    the cache checks), or to free the buffers' memory.

    >>> m = FFTConv(torch.randn(2, 2, 3))
    >>> _ = m(torch.randn(1, 2, 10))
    >>> clear_fft_cache(m)
    """
    if module is None:
        _SPECTRUM_CACHE.clear()
        _WORKSPACES.clear()
        return
    for p in module.parameters():
        _SPECTRUM_CACHE.pop(p, None)
        _WORKSPACES.pop(p, None)


class _CachedSpectrum(torch.autograd.Function):
    """Returns a cached spectrum; its backward re-derives the spectrum to reach the weights."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, spectrum: Tensor, compute: Callable[..., Tensor], *deps: Tensor
    ) -> Tensor:
        ctx.compute = compute
        ctx.save_for_backward(*deps)
        return spectrum.view_as(spectrum)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        deps = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [d.detach().requires_grad_(d.requires_grad) for d in deps]
            out = ctx.compute(*inputs)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, *[next(grads) if t.requires_grad else None for t in inputs])


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _stamp(deps: Sequence[Tensor]) -> Optional[tuple]:
    """(version, data_ptr) per tensor, or None unless all are plain, real, non-inference tensors
    (fake / functional / meta / vmapped tensors are never cached and never use work buffers)."""
    try:
        if any(
            type(d) not in (Tensor, nn.Parameter)
            or d.device.type == "meta"
            or is_fake(d)
            or d.is_inference()
            or _is_functorch_wrapped(d)
            for d in deps
        ):
            return None
        return tuple((d._version, d.data_ptr()) for d in deps)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _spectrum(
    owner: Tensor,
    key: tuple,
    deps: tuple[Tensor, ...],
    compute: Callable[..., Tensor],
    use_cache: bool,
) -> Tensor:
    """``compute(*deps)``, from the cache when the deps are unchanged; always differentiable."""
    stamp = _stamp(deps) if use_cache and not torch.compiler.is_compiling() else None
    if stamp is None:
        return compute(*deps)
    needs_grad = torch.is_grad_enabled() and any(d.requires_grad for d in deps)
    key = key + (torch.is_inference_mode_enabled(),)
    entries = _SPECTRUM_CACHE.get(owner)
    if entries is None:
        entries = {}
        _SPECTRUM_CACHE[owner] = entries
    hit = entries.get(key)
    if hit is not None and hit[0] == stamp:
        return _CachedSpectrum.apply(hit[1], compute, *deps) if needs_grad else hit[1]
    if needs_grad:  # e.g. training: the weights change every step, compute with autograd
        spec = compute(*deps)
        stored = spec.detach()
    else:
        with torch.no_grad():
            spec = stored = compute(*deps)
    entries.pop(key, None)
    while len(entries) >= _MAX_ENTRIES_PER_OWNER:
        entries.pop(next(iter(entries)))
    entries[key] = (stamp, stored)
    return spec


# ---------------------------------------------------------------------------------------------
# The block: [mix S->R_s] -> FFT conv R_s->R_t -> [mix R_t->T] (+ bias)
# ---------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"fft_conv expects a floating-point input, got {x.dtype}")
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


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


def _fft_block(
    x: Tensor,
    first: Optional[Tensor],
    core: Tensor,
    last: Optional[Tensor],
    bias: Optional[Tensor],
    stride: _IntOrTuple,
    padding: _Padding,
    dilation: _IntOrTuple,
    padding_mode: str,
    mix_last_in_frequency: bool,
    use_cache: bool,
    reuse_buffers: bool = False,
) -> Tensor:
    n = core.dim() - 2
    if n not in (1, 2, 3):
        raise ValueError(
            f"expected a 1-3 d conv kernel (C_out, C_in, *k), got shape {tuple(core.shape)}"
        )
    c_in = first.shape[1] if first is not None else core.shape[1]
    unbatched = x.dim() == n + 1
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != n + 2 or x.shape[1] != c_in:
        raise ValueError(
            f"expected input (B, {c_in}, <{n} spatial dims>) or unbatched ({c_in}, <{n} dims>) "
            f"for kernel {tuple(core.shape)}, got {tuple(x.shape)}"
        )
    if first is not None and first.shape[0] != core.shape[1]:
        raise ValueError(f"first {tuple(first.shape)} does not feed core {tuple(core.shape)}")
    if last is not None and last.shape[1] != core.shape[0]:
        raise ValueError(f"last {tuple(last.shape)} does not follow core {tuple(core.shape)}")
    n_out = last.shape[0] if last is not None else core.shape[0]
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")

    out_dtype = x.dtype
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    plan = _make_plan(x, tuple(core.shape[2:]), stride, padding, dilation, padding_mode)

    # The kernel spectrum, cached on the Parameters themselves (not on dtype-cast copies).
    key = (plan, x.device, dtype)
    merged = last is not None and mix_last_in_frequency
    if merged:
        w_hat = _spectrum(
            core,
            key + ("last",),
            (core, last),
            # linearity: the spectrum of (last x core) is last x (the core's spectrum)
            lambda c, l: _kernel_spectrum(
                torch.einsum("tr,rs...->ts...", l.to(dtype), c.to(dtype)), plan
            ),
            use_cache,
        )
        c_mid = last.shape[0]
    else:
        w_hat = _spectrum(
            core, key, (core,), lambda c: _kernel_spectrum(c.to(dtype), plan), use_cache
        )
        c_mid = core.shape[0]
    first = None if first is None else first.to(dtype)
    last = None if (last is None or merged) else last.to(dtype)
    bias = None if bias is None else bias.to(dtype)

    # Under torch.compile / torch.export nothing here may branch on the batch size: checked
    # first, so that the size test below is never traced (it would guard, i.e. specialise, a
    # dynamic batch). The buffered path is eager-only anyway.
    buffered = (
        reuse_buffers
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.shape[0] * c_mid * math.prod(plan.fft_shape) * x.element_size() >= _BUFFER_MIN_BYTES
        and _stamp((x, core)) is not None  # real tensors (not fake / functional / inference)
        and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, first, w_hat, last, bias)))
    )
    if buffered:
        y = _run_buffered(x, first, w_hat, c_mid, last, bias, plan, core)
    else:
        if first is not None:
            x = _channel_mix(x, first, None)
        y = _inverse_crop(_spectral_mix(_forward_spectrum(x, plan), w_hat), plan)
        if last is not None:
            y = _channel_mix(y, last, bias)
        elif bias is not None:
            y = y + bias.view(-1, *([1] * n))
        y = y.contiguous()
    if unbatched:
        y = y.squeeze(0)
    return y.to(out_dtype)


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


def fft_conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation)`` (groups=1) computed by FFT.

    ``weight`` is (C_out, C_in, *k) with 1-3 spatial dims; ``x`` is (B, C_in, *spatial) or
    unbatched (C_in, *spatial). ``padding`` is an int, a tuple, ``'same'`` or ``'valid'`` as
    in PyTorch; ``padding_mode`` is applied like ``nn.ConvNd`` does ('zeros', 'reflect',
    'replicate', 'circular'). Differentiable; the kernel spectrum is recomputed on every call
    (use :class:`FFTConv` to cache it).

    >>> x, w = torch.randn(1, 2, 8, 20, 20), torch.randn(3, 2, 3, 5, 5)
    >>> y = fft_conv(x, w, padding=(1, 2, 2))
    >>> ref = F.conv3d(x, w, padding=(1, 2, 2))
    >>> bool((y - ref).norm() / ref.norm() < 1e-5)
    True
    """
    return _fft_block(
        x, None, weight, None, bias, stride, padding, dilation, padding_mode, False, False
    )


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
    # A leaf for torch.fx.symbolic_trace: modules outside torch.nn are traced through, and the
    # shape-dependent planning here cannot run on Proxies. The traced graph gets one
    # call_function node with the parameters as get_attr inputs (and keeps the cache: it is
    # keyed on those Parameter objects).
    return _fft_block(
        x, first, core, last, bias, stride, padding, dilation, padding_mode,
        mix_last_in_frequency, True, reuse_buffers,
    )


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _check_mode_and_padding(
    n: int, padding: _Padding, padding_mode: str
) -> Union[tuple[int, ...], str]:
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        return padding
    return _tuple(padding, n, "padding")


class FFTConv(nn.Module):
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
        n = weight.dim() - 2
        if n not in (1, 2, 3):
            raise ValueError(
                f"weight must be (C_out, C_in, *k) with 1-3 spatial dims, got {tuple(weight.shape)}"
            )
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach().clone())
        )
        self.stride = _tuple(stride, n, "stride")
        self.padding = _check_mode_and_padding(n, padding, padding_mode)
        self.dilation = _tuple(dilation, n, "dilation")
        self.padding_mode = padding_mode
        self.reuse_buffers = bool(reuse_buffers)
        k = tuple(weight.shape[2:])
        _normalize(n, k, self.stride, self.padding, self.dilation, padding_mode)

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
        return _fft_block_cached(
            x, None, self.weight, None, self.bias, self.stride, self.padding, self.dilation,
            self.padding_mode, False, self.reuse_buffers,
        )

    def extra_repr(self) -> str:
        c_out, c_in, *k = self.weight.shape
        s = f"{c_in}, {c_out}, kernel_size={tuple(k)}, stride={self.stride}, padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"


class TuckerFFTConv(nn.Module):
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
        n = core.dim() - 2
        if n not in (1, 2, 3):
            raise ValueError(
                f"core must be (R_t, R_s, *k) with 1-3 spatial dims, got {tuple(core.shape)}"
            )
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
        self.stride = _tuple(stride, n, "stride")
        self.padding = _check_mode_and_padding(n, padding, padding_mode)
        self.dilation = _tuple(dilation, n, "dilation")
        self.padding_mode = padding_mode
        self.mix_last_in_frequency = bool(mix_last_in_frequency)
        self.reuse_buffers = bool(reuse_buffers)
        _normalize(n, tuple(core.shape[2:]), self.stride, self.padding, self.dilation, padding_mode)

    @property
    def in_channels(self) -> int:
        return self.first.shape[1] if self.first is not None else self.core.shape[1]

    @property
    def out_channels(self) -> int:
        return self.last.shape[0] if self.last is not None else self.core.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return _fft_block_cached(
            x, self.first, self.core, self.last, self.bias, self.stride, self.padding,
            self.dilation, self.padding_mode, self.mix_last_in_frequency, self.reuse_buffers,
        )

    def extra_repr(self) -> str:
        r_t, r_s, *k = self.core.shape
        s = (
            f"{self.in_channels} -> {r_s} -> {r_t} -> {self.out_channels}, kernel_size={tuple(k)}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
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
