"""Native CPU kernels for the shapes a decomposition leaves, built on first use with the system's C compiler.

- ``narrow_conv3d.c``: a 3x3x3 conv (stride 1, padding 1) with few channels. oneDNN, which runs
  ATen's and inductor's CPU convs, computes a 3x3x3 conv with 4 channels or fewer at 9-14 GMAC/s
  on the project's CPUs; the cores of Tucker blocks at rank 0.25 of a 16-channel layer are exactly
  that, and they were the largest item of the compressed MONAI SegResNet's profile
  (``docs/benchmarks.md``). This kernel runs them at 24-31 GMAC/s on one thread.
- ``pointwise_chain.c``: ``W z + b`` (a 1x1 product with a narrow side, which ``torch.mm`` runs
  on one thread); ``W2 act(W1 z + b1) + b2`` per position, a block's last factor, its
  norm and activation and the next block's first factor without the full-width map between them;
  ``W z + b + skip``, a last factor and the residual sum after it in one pass; and
  ``W act(a z + b) + b2`` with per-channel ``a``, ``b``, a norm (statistics from ``row_moments``),
  its activation and the next 1x1 product without the normalised map.
- ``upsample.c``: trilinear up-sampling by 2 (``align_corners=False``), optionally plus a skip map.

All are AVX2 + FMA, float32. The library is compiled once per source and flags with ``cc`` (or
``$CC``) into ``$TUCKER_FX_CACHE_DIR/native`` (default ``~/.cache/tucker_fx/native``) and loaded
with ``ctypes``. Where torch runs on GNU OpenMP (its Linux wheels), the library is built with
``-fopenmp`` and its kernels split their work over torch's own OpenMP thread pool
(``torch.get_num_threads()`` threads, at most :data:`MAX_THREADS`; ``parallel.h`` says why);
elsewhere they run on the calling thread. Where there is no compiler, no AVX2, or
``TUCKER_FX_NATIVE=0``, :func:`available` is False with the reason in :func:`status`, and
:class:`~tucker_fx.kernels.narrow_conv.NarrowConv3d` runs on oneDNN instead.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from tucker_fx.kernels import native
    >>> x, w, b = torch.randn(1, 4, 5, 6, 19), torch.randn(4, 4, 3, 3, 3), torch.randn(4)
    >>> y = native.narrow_conv3d(x, w, b) if native.available() else F.conv3d(x, w, b, padding=1)
    >>> bool(torch.allclose(y, F.conv3d(x, w, b, padding=1), atol=1e-4))
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["available", "status", "threading_mode", "gomp_libraries", "MAX_THREADS", "narrow_conv3d", "pointwise", "pointwise_chain",
           "pointwise_add", "norm_act_pointwise", "normed_chain", "upsample2x_trilinear", "FLAGS"]

_SOURCES = tuple(Path(__file__).with_name(n) for n in ("narrow_conv3d.c", "pointwise_chain.c", "upsample.c"))
_HEADERS = (Path(__file__).with_name("parallel.h"),)
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-std=c11")
"""The compiler flags (AVX2 + FMA: the library only loads on CPUs that have both); ``-fopenmp`` is
added where torch runs on GNU OpenMP."""

MAX_THREADS: Optional[int] = None
"""The most threads a kernel call splits its work over; None: ``torch.get_num_threads()``, as torch's
own ops. Small calls use fewer (each thread gets at least 4096 positions or 4 planes)."""

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get("TUCKER_FX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tucker_fx")
    return Path(root) / "native"


def _cpu_ok() -> Optional[str]:
    """None if this CPU runs the library, else why not."""
    if sys.platform not in ("linux", "darwin") or os.uname().machine not in ("x86_64", "AMD64"):
        return f"not an x86-64 Linux/macOS machine ({sys.platform}, {os.uname().machine})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 + FMA (torch reports {capability!r})"
    return None


def gomp_libraries() -> set[str]:
    """The files of this process's GNU OpenMP runtimes that answer to the name ``libgomp.so.1``, the
    one ``-fopenmp`` links: torch's. Copies that wheels vendor under another name (scikit-learn's
    ``libgomp-<hash>.so.1.0.0``) are separate runtimes that nothing of ours binds to, and are left out.
    Empty where ``/proc`` is not readable.

    Example:
        >>> len(gomp_libraries()) <= 1
        True
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return set()
    return {p for p in paths if os.path.basename(p).startswith("libgomp.so")}


def _torch_on_gomp() -> bool:
    """Whether torch's thread pool is GNU OpenMP's (``libgomp.so.1`` loaded in this process), the runtime
    that ``-fopenmp`` links: only then do the kernels share torch's threads rather than start a second pool."""
    return bool(gomp_libraries())


def _build() -> ctypes.CDLL:
    """The library, with OpenMP where torch runs on libgomp and the build takes it, else without."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang or $CC)")
    if _torch_on_gomp():
        try:
            lib = _compile(compiler, FLAGS + ("-fopenmp",))
            _state["threads"] = "OpenMP, torch's thread pool"
            return lib
        except (RuntimeError, OSError) as e:
            _state["threads"] = f"the calling thread (an OpenMP build failed: {str(e)[:200]})"
    else:
        _state["threads"] = "the calling thread (torch does not run on GNU OpenMP here)"
    return _compile(compiler, FLAGS)


def _compile(compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    source = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    key = hashlib.sha256(source + " ".join((compiler,) + flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"tucker_fx_native-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            where = target.parent
        except OSError:
            where = Path(tempfile.mkdtemp(prefix="tucker_fx_native_"))
            target = where / target.name
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=where)
        os.close(fd)
        done = subprocess.run([compiler, *flags, *map(str, _SOURCES), "-lm", "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: another process may be building the same file
    lib = ctypes.CDLL(str(target))
    ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    for name, args in (("tfx_narrow_conv3d", [ptr] * 4 + [i32] * 7),
                       ("tfx_pointwise_chain", [ptr] * 6 + [i32] * 4 + [i64, f32, i64, i64, i32]),
                       ("tfx_pointwise_add", [ptr] * 5 + [i32] * 3 + [i64, i32]),
                       ("tfx_affine_act_pointwise", [ptr] * 6 + [i32] * 3 + [i64, f32, i32]),
                       ("tfx_row_moments", [ptr, ptr, i64, i64, i32]),
                       ("tfx_normed_chain", [ptr] * 5 + [i32, ctypes.c_double] + [ptr] * 3 + [i32] * 4
                        + [i64, f32, i32]),
                       ("tfx_norm_act", [ptr] * 3 + [i32, ctypes.c_double] + [ptr] * 3 + [i32] * 3 + [i64, f32, i32]),
                       ("tfx_upsample2x_trilinear", [ptr] * 3 + [i64] + [i32] * 4)):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, args
    return lib


def _library() -> Optional[ctypes.CDLL]:
    with _lock:
        if "lib" not in _state:
            why: Optional[str] = None
            lib = None
            if os.environ.get("TUCKER_FX_NATIVE", "1") == "0":
                why = "disabled by TUCKER_FX_NATIVE=0"
            else:
                why = _cpu_ok()
            if why is None:
                try:
                    lib = _build()
                except Exception as e:  # no compiler, a failed build, a library that does not load
                    why = f"build failed: {e}"
            _state["lib"], _state["why"] = lib, why or "loaded"
        return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the native kernel runs on this machine (builds it on the first call)."""
    return _library() is not None


def status() -> str:
    """``"loaded"``, or why the native kernel does not run here."""
    _library()
    return str(_state["why"])


def threading_mode() -> str:
    """Where the kernels run their work: ``"OpenMP, torch's thread pool"``, or ``"the calling thread
    (...)"`` with the reason; ``"not loaded"`` where :func:`available` is False.

    Example:
        >>> threading_mode() in ("OpenMP, torch's thread pool", "not loaded") or threading_mode().startswith("the calling")
        True
    """
    return str(_state.get("threads", "not loaded")) if available() else "not loaded"


def narrow_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.conv3d(x, weight, bias, padding=1)`` for float32 CPU tensors, on the native kernel.

    Raises ``RuntimeError`` when :func:`available` is False; the caller checks first. The samples
    and output planes are split over torch's threads (:data:`MAX_THREADS`)."""
    lib = _loaded()
    if x.dim() != 5 or weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"narrow_conv3d: expected x (N, C, D, H, W) and weight (O, C, 3, 3, 3), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    _check_float32_cpu("narrow_conv3d", x=x, weight=weight, bias=bias)
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    n, c, d, h, w = x.shape
    o = weight.shape[0]
    y = torch.empty((n, o, d, h, w), dtype=x.dtype)
    bp = bias.data_ptr() if bias is not None else None
    if n and lib.tfx_narrow_conv3d(x.data_ptr(), weight.data_ptr(), bp, y.data_ptr(), n, c, o, d, h, w, _threads()):
        raise MemoryError("narrow_conv3d: the native kernel could not allocate its buffers")
    return y


MAX_CHAIN = (64, 512, 64)
"""The largest (R1, C, R2) that :func:`pointwise_chain` takes."""


def pointwise_chain(z: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Optional[Tensor], slope: float) -> Tensor:
    """``W2 act(W1 z + b1) + b2`` over the positions of ``z`` (N, R1, *spatial), with ``act`` a leaky
    ReLU of ``slope`` (0: ReLU): a 1x1 conv, an activation and a 1x1 conv, the C-channel map between
    never written. ``w1`` (C, R1) and ``b1`` (C,) may carry a leading N (per-sample weights, as a
    norm folded into ``w1`` gives); ``w2`` is (R2, C). Float32 CPU tensors.

    Example:
        >>> z, w1, b1, w2 = torch.randn(1, 4, 3, 5, 7), torch.randn(16, 4), torch.randn(16), torch.randn(4, 16)
        >>> ref = torch.einsum("oc,ncdhw->nodhw", w2, torch.relu(torch.einsum("cr,nrdhw->ncdhw", w1, z)
        ...                                                                   + b1[:, None, None, None]))
        >>> y = pointwise_chain(z, w1, b1, w2, None, 0.0) if available() else ref
        >>> bool(torch.allclose(y, ref, atol=1e-4))
        True
    """
    lib = _loaded()
    n, r1 = z.shape[:2]
    c, r2 = w1.shape[-2], w2.shape[0]
    if (w1.shape[-1] != r1 or w2.shape != (r2, c) or b1.shape[-1] != c or (b2 is not None and b2.shape != (r2,))
            or w1.dim() not in (2, 3) or (w1.dim() == 3 and w1.shape[0] != n) or b1.dim() != w1.dim() - 1):
        raise ValueError(f"pointwise_chain: expected z (N, R1, ...), w1 ([N,] C, R1), b1 ([N,] C), w2 (R2, C), "
                         f"b2 (R2,), got {tuple(z.shape)}, {tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, "
                         f"{None if b2 is None else tuple(b2.shape)}")
    if r1 > MAX_CHAIN[0] or c > MAX_CHAIN[1] or r2 > MAX_CHAIN[2]:
        raise ValueError(f"pointwise_chain: at most (R1, C, R2) = {MAX_CHAIN}, got {(r1, c, r2)}")
    _check_float32_cpu("pointwise_chain", z=z, w1=w1, b1=b1, w2=w2, b2=b2)
    z, w1, b1, w2 = z.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous()
    b2 = None if b2 is None else b2.contiguous()
    positions = z[0, 0].numel() if n else 0
    y = torch.empty((n, r2) + tuple(z.shape[2:]), dtype=z.dtype)
    per_sample = w1.dim() == 3
    b2p = None if b2 is None else b2.data_ptr()
    if positions and lib.tfx_pointwise_chain(z.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2p,
                                             y.data_ptr(), n, r1, c, r2, positions, float(slope),
                                             c * r1 if per_sample else 0, c if per_sample else 0, _threads()):
        raise ValueError("pointwise_chain: the native kernel refused its shapes")
    return y


def pointwise(z: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """``W z + b`` over the positions of ``z`` (N, R, *spatial), ``weight`` (C, R): a 1x1 conv, into
    ``out`` (N, C, *spatial, contiguous) when given. Float32 CPU tensors. Faster than ``torch.mm``
    where one side is narrow (a Tucker block's factors; ``kernels.pointwise.native_product_wins``).

    Example:
        >>> z, w, b = torch.randn(1, 16, 3, 5, 7), torch.randn(4, 16), torch.randn(4)
        >>> ref = torch.einsum("cr,nrdhw->ncdhw", w, z) + b[:, None, None, None]
        >>> y = pointwise(z, w, b) if available() else ref
        >>> bool(torch.allclose(y, ref, atol=1e-5))
        True
    """
    lib = _loaded()
    n, r = z.shape[:2]
    c = weight.shape[0]
    shape = (n, c) + tuple(z.shape[2:])
    if weight.shape != (c, r) or (bias is not None and bias.shape != (c,)) or z.dim() < 3:
        raise ValueError(f"pointwise: expected z (N, R, ...), weight (C, R), bias (C,), got {tuple(z.shape)}, "
                         f"{tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}")
    if r > MAX_CHAIN[1]:
        raise ValueError(f"pointwise: at most {MAX_CHAIN[1]} input channels, got {r}")
    _check_float32_cpu("pointwise", z=z, weight=weight, bias=bias, out=out)
    if out is not None and (tuple(out.shape) != shape or not out.is_contiguous()):
        raise ValueError(f"pointwise: expected a contiguous out of {shape}, got {tuple(out.shape)}")
    z, weight = z.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(shape, dtype=z.dtype) if out is None else out
    positions = z[0, 0].numel() if n else 0
    bp = None if bias is None else bias.data_ptr()
    if positions and lib.tfx_pointwise_add(z.data_ptr(), weight.data_ptr(), bp, None, y.data_ptr(), n, r, c,
                                           positions, _threads()):
        raise ValueError("pointwise: the native kernel refused its shapes")
    return y


def pointwise_add(z: Tensor, weight: Tensor, bias: Optional[Tensor], skip: Tensor, inplace: bool = False) -> Tensor:
    """``W z + b + skip`` over the positions of ``z`` (N, R, *spatial), with ``weight`` (C, R) and
    ``skip`` (N, C, *spatial): a 1x1 conv and the residual sum after it in one pass. ``inplace``:
    the result is written into ``skip`` (which must be contiguous). Float32 CPU tensors.

    Example:
        >>> z, w, skip = torch.randn(1, 4, 3, 5, 7), torch.randn(16, 4), torch.randn(1, 16, 3, 5, 7)
        >>> ref = torch.einsum("cr,nrdhw->ncdhw", w, z) + skip
        >>> y = pointwise_add(z, w, None, skip) if available() else ref
        >>> bool(torch.allclose(y, ref, atol=1e-5))
        True
    """
    lib = _loaded()
    n, r = z.shape[:2]
    c = weight.shape[0]
    if (weight.shape != (c, r) or tuple(skip.shape) != (n, c) + tuple(z.shape[2:])
            or (bias is not None and bias.shape != (c,))):
        raise ValueError(f"pointwise_add: expected z (N, R, ...), weight (C, R), bias (C,), skip (N, C, ...), got "
                         f"{tuple(z.shape)}, {tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}, "
                         f"{tuple(skip.shape)}")
    if r > MAX_CHAIN[1]:
        raise ValueError(f"pointwise_add: at most {MAX_CHAIN[1]} input channels, got {r}")
    _check_float32_cpu("pointwise_add", z=z, weight=weight, bias=bias, skip=skip)
    if inplace and not skip.is_contiguous():
        raise ValueError("pointwise_add: inplace needs a contiguous skip")
    z, weight = z.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    skip = skip.contiguous()
    y = skip if inplace else torch.empty_like(skip)
    positions = z[0, 0].numel() if n else 0
    bp = None if bias is None else bias.data_ptr()
    if positions and lib.tfx_pointwise_add(z.data_ptr(), weight.data_ptr(), bp, skip.data_ptr(), y.data_ptr(), n, r,
                                           c, positions, _threads()):
        raise ValueError("pointwise_add: the native kernel refused its shapes")
    return y


def normed_chain(z: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int, gamma: Optional[Tensor],
                 beta: Optional[Tensor], eps: float, w2: Tensor, b2: Optional[Tensor], slope: float) -> Tensor:
    """``W2 act(group_norm(W z + b)) + b2`` over the positions of ``z`` (N, R, *spatial), ``weight``
    (C, R), ``w2`` (R2, C): a block's last factor, a GroupNorm (InstanceNorm: ``groups = C``) with
    ``gamma``/``beta``, its activation and the next block's first factor in one call. The norm's
    statistics come from the mean and covariance of ``z`` (one pass, shifted sums added in double;
    ``kernels/norm_fold.py`` has the algebra), folded into ``W``; then :func:`pointwise_chain`.
    Float32 CPU tensors; R and R2 at most 64.

    Example:
        >>> import torch.nn.functional as F
        >>> z, w, w2 = torch.randn(1, 4, 3, 5, 7) + 3, torch.randn(16, 4), torch.randn(4, 16)
        >>> ref = torch.einsum("oc,ncdhw->nodhw", w2, F.relu(F.group_norm(torch.einsum("cr,nrdhw->ncdhw", w, z), 4)))
        >>> y = normed_chain(z, w, None, 4, None, None, 1e-5, w2, None, 0.0) if available() else ref
        >>> bool(torch.allclose(y, ref, atol=1e-4))
        True
    """
    lib = _loaded()
    n, r = z.shape[:2]
    c, r2 = weight.shape[0], w2.shape[0]
    if (z.dim() < 3 or weight.shape != (c, r) or w2.shape != (r2, c) or c % groups
            or any(t is not None and t.shape != (c,) for t in (bias, gamma, beta))
            or (b2 is not None and b2.shape != (r2,))):
        raise ValueError(f"normed_chain: expected z (N, R, ...), weight (C, R) with C a multiple of groups, bias, "
                         f"gamma and beta (C,), w2 (R2, C), b2 (R2,), got {tuple(z.shape)}, {tuple(weight.shape)}, "
                         f"groups {groups}, {tuple(w2.shape)}")
    if r > MAX_CHAIN[0] or c > MAX_CHAIN[1] or r2 > MAX_CHAIN[2]:
        raise ValueError(f"normed_chain: at most (R, C, R2) = {MAX_CHAIN}, got {(r, c, r2)}")
    _check_float32_cpu("normed_chain", z=z, weight=weight, bias=bias, gamma=gamma, beta=beta, w2=w2, b2=b2)
    z, weight, w2 = z.contiguous(), weight.contiguous(), w2.contiguous()
    bias, gamma, beta, b2 = (None if t is None else t.contiguous() for t in (bias, gamma, beta, b2))
    positions = z[0, 0].numel() if n else 0
    y = torch.empty((n, r2) + tuple(z.shape[2:]), dtype=z.dtype)
    ptr = [None if t is None else t.data_ptr() for t in (bias, gamma, beta, b2)]
    if n and positions and lib.tfx_normed_chain(z.data_ptr(), weight.data_ptr(), ptr[0], ptr[1], ptr[2], groups,
                                                float(eps), w2.data_ptr(), ptr[3], y.data_ptr(), n, r, c, r2,
                                                positions, float(slope), _threads()):
        raise MemoryError("normed_chain: the native kernel could not allocate its buffers")
    return y


def norm_act_pointwise(x: Tensor, groups: int, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                       slope: float, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``W act(group_norm(x)) + b`` over the positions of ``x`` (N, C, *spatial), with ``act`` a leaky
    ReLU of ``slope`` and ``weight`` (R, C): a GroupNorm (an InstanceNorm: ``groups = C``), its
    activation and a 1x1 conv, the normalised map never written. The statistics come from one
    pass over ``x`` (shifted sums, added in double), all in one native call. Float32 CPU tensors.

    Example:
        >>> import torch.nn.functional as F
        >>> x, w = torch.randn(1, 16, 3, 5, 7), torch.randn(4, 16)
        >>> ref = torch.einsum("oc,ncdhw->nodhw", w, F.relu(F.group_norm(x, 4, eps=1e-5)))
        >>> y = norm_act_pointwise(x, 4, None, None, 1e-5, 0.0, w, None) if available() else ref
        >>> bool(torch.allclose(y, ref, atol=1e-4))
        True
    """
    lib = _loaded()
    n, c = x.shape[:2]
    r = weight.shape[0]
    if (x.dim() < 3 or c % groups or weight.shape != (r, c) or (bias is not None and bias.shape != (r,))
            or any(t is not None and t.shape != (c,) for t in (gamma, beta))):
        raise ValueError(f"norm_act_pointwise: expected x (N, C, ...) with C a multiple of groups, gamma and beta "
                         f"(C,), weight (R, C), bias (R,), got {tuple(x.shape)}, groups {groups}, "
                         f"{tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}")
    if c > MAX_CHAIN[1] or r > MAX_CHAIN[2]:
        raise ValueError(f"norm_act_pointwise: at most {MAX_CHAIN[1]} channels in and {MAX_CHAIN[2]} out, got {(c, r)}")
    _check_float32_cpu("norm_act_pointwise", x=x, weight=weight, bias=bias, gamma=gamma, beta=beta)
    x, weight = x.contiguous(), weight.contiguous()
    bias, gamma, beta = (None if t is None else t.contiguous() for t in (bias, gamma, beta))
    positions = x[0, 0].numel() if n else 0
    y = torch.empty((n, r) + tuple(x.shape[2:]), dtype=x.dtype)
    ptr = [None if t is None else t.data_ptr() for t in (gamma, beta, bias)]
    if n and positions and lib.tfx_norm_act(x.data_ptr(), ptr[0], ptr[1], groups, float(eps), weight.data_ptr(),
                                            ptr[2], y.data_ptr(), n, c, r, positions, float(slope), _threads()):
        raise MemoryError("norm_act_pointwise: the native kernel could not allocate its buffer")
    return y


def upsample2x_trilinear(x: Tensor, skip: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
    """``F.interpolate(x, scale_factor=2, mode="trilinear")`` (+ ``skip``), ``x`` (N, C, D, H, W) float32
    on the CPU; ``inplace``: written into ``skip`` (contiguous).

    Example:
        >>> import torch.nn.functional as F
        >>> x = torch.randn(1, 3, 4, 5, 9)
        >>> ref = F.interpolate(x, scale_factor=2, mode="trilinear")
        >>> y = upsample2x_trilinear(x) if available() else ref
        >>> bool(torch.allclose(y, ref, atol=1e-6))
        True
    """
    lib = _loaded()
    if x.dim() != 5 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"upsample2x_trilinear: expected a float32 CPU (N, C, D, H, W) tensor, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    n, c, d, h, w = x.shape
    shape = (n, c, 2 * d, 2 * h, 2 * w)
    if skip is not None and (tuple(skip.shape) != shape or skip.dtype != x.dtype or skip.device != x.device):
        raise ValueError(f"upsample2x_trilinear: expected a skip of {shape} float32, got {tuple(skip.shape)} {skip.dtype}")
    if inplace and (skip is None or not skip.is_contiguous()):
        raise ValueError("upsample2x_trilinear: inplace needs a contiguous skip")
    x = x.contiguous()
    skip = None if skip is None else skip.contiguous()
    y = skip if inplace else torch.empty(shape, dtype=x.dtype)
    sp = None if skip is None else skip.data_ptr()
    if lib.tfx_upsample2x_trilinear(x.data_ptr(), sp, y.data_ptr(), n * c, d, h, w, _threads()):
        raise MemoryError("upsample2x_trilinear: the native kernel could not allocate its buffer")
    return y


def _loaded() -> ctypes.CDLL:
    """The library, or ``RuntimeError`` saying why it does not run here (callers check :func:`available`)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"tucker_fx native kernel: not available ({status()})")
    return lib


def _check_float32_cpu(where: str, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"{where}: expected float32 CPU tensors, got {name} {t.dtype} on {t.device}")


def _threads() -> int:
    limit = torch.get_num_threads()
    return max(1, limit if MAX_THREADS is None else min(MAX_THREADS, limit))
