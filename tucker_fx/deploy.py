"""Deployable artifacts from a compressed model in one call: a ``.pt2`` (``torch.export``) or an ``.onnx`` file.

The catches of exporting are handled where they happen:

- ONNX has no complex tensors, and torch's exporter stops on an FFT-lowered layer with
  "No decompositions registered for the complex-valued input". :func:`to_onnx` first swaps each
  FFT-lowered layer (:class:`~tucker_fx.kernels.FFTConv`, :class:`~tucker_fx.kernels.TuckerFFTConv`)
  for the same computation as plain convolutions (:func:`without_fft`; same weights, the output
  agrees to float rounding). Compressing with ``lowering="none"`` avoids FFT layers altogether.
- ``torch.export`` specialises a dimension of size 1: an example of batch 1 exports a program that
  accepts batch 1 only, and asking for a dynamic batch on it fails with "You marked batch as
  dynamic but your code specialized it to be a constant (1)". With ``dynamic_batch=True`` the
  example is repeated to batch 2 and exported with ``Dim("batch", min=1, max=max_batch)``; the
  program is then run at batch 1 and 3 and compared with the module before it is returned.
- A model compressed from an ``ExportedProgram`` is loaded with ``tucker_fx.load(path, ep.module(), x)``
  (the architecture as a module), not with the program itself.

Example:
    >>> import tempfile, torch, torch.nn as nn, tucker_fx
    >>> from tucker_fx.deploy import to_pt2
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    >>> x = torch.randn(1, 3, 12, 12)
    >>> result = tucker_fx.compress(model, x, config=tucker_fx.TuckerConfig(rank=0.5, progress=False))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     ep = to_pt2(result.module, x, tmp + "/model.pt2", dynamic_batch=True)
    ...     tuple(torch.export.load(tmp + "/model.pt2").module()(torch.randn(4, 3, 12, 12)).shape)
    (4, 8, 8, 8)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx.kernels import FFTConv, TuckerFFTConv

__all__ = ["to_pt2", "to_onnx", "without_fft", "batch_dims", "ExportCheck"]

PathLike = Union[str, "os.PathLike[str]"]
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_COMPLEX_HINT = (
    "ONNX has no complex tensors, and an FFT-lowered layer computes with them. tucker_fx.deploy.to_onnx "
    "swaps FFTConv/TuckerFFTConv modules for plain convolutions, but this one is not a module of the graph "
    "(a model captured with torch.export?): compress with TuckerConfig(lowering='none') "
    "(CLI: tucker-fx compress ... --lowering none) and export again"
)


class _DirectTucker(nn.Module):
    """A :class:`TuckerFFTConv` computed by direct convolutions: 1x1 ``first``, the core, 1x1 ``last`` (+bias)."""

    def __init__(self, m: TuckerFFTConv) -> None:
        super().__init__()
        n = m.core.dim() - 2
        self.n, self.stride, self.padding, self.dilation = n, m.stride, m.padding, m.dilation
        self.padding_mode = m.padding_mode
        ones = (1,) * n
        self.first = None if m.first is None else nn.Parameter(m.first.detach().reshape(*m.first.shape, *ones).clone())
        self.core = nn.Parameter(m.core.detach().clone())
        self.last = None if m.last is None else nn.Parameter(m.last.detach().reshape(*m.last.shape, *ones).clone())
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = _CONV[self.n]
        if self.first is not None:
            x = conv(x, self.first)
        padding: Any = self.padding
        if self.padding_mode != "zeros" and not isinstance(padding, str):
            pad = [p for p in reversed(padding) for _ in range(2)]
            x = F.pad(x, pad, mode=self.padding_mode)
            padding = 0
        core_bias = self.bias if self.last is None else None
        x = conv(x, self.core, core_bias, self.stride, padding, self.dilation)
        if self.last is not None:
            x = conv(x, self.last, self.bias)
        return x


def _direct_conv(m: FFTConv) -> nn.Module:
    n = m.weight.dim() - 2
    c_out, c_in, *k = m.weight.shape
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    conv = cls(c_in, c_out, tuple(k), stride=m.stride, padding=m.padding, dilation=m.dilation,
               bias=m.bias is not None, padding_mode=m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(m.weight)
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv


def without_fft(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``module`` with each FFT-lowered layer computed by plain convolutions, and their names.

    ``module`` itself is not modified; with no FFT layer it is returned as it is.
    """
    names = [name for name, m in module.named_modules() if isinstance(m, (FFTConv, TuckerFFTConv))]
    if not names:
        return module, []
    out = copy.deepcopy(module)
    for name in names:
        m = out.get_submodule(name)
        direct = _direct_conv(m) if isinstance(m, FFTConv) else _DirectTucker(m)
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, direct)
    if isinstance(out, fx.GraphModule):
        out.recompile()
    return out, names


def _batched(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x[:1].expand(batch, *x.shape[1:]).clone()


def batch_dims(example_inputs: tuple, max_batch: Optional[int] = None) -> tuple[tuple, tuple]:
    """Example inputs of batch >= 2 and ``dynamic_shapes`` that mark dim 0 of each tensor as one ``batch``.

    ``torch.export`` specialises a size-1 dimension, so a batch-1 example is repeated to batch 2.
    """
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch) if max_batch is not None else Dim("batch", min=1)
    inputs = tuple(_batched(t, 2) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t
                   for t in example_inputs)
    shapes = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() else None for t in inputs)
    return inputs, shapes


class ExportCheck:
    """What a round trip through the artifact gave: the relative error at each batch tried."""

    def __init__(self) -> None:
        self.errors: dict[int, float] = {}

    def __str__(self) -> str:
        return ", ".join(f"batch {b}: rel. error {e:.2g}" for b, e in sorted(self.errors.items()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _check_batches(module: nn.Module, run: Any, x: torch.Tensor, batches: tuple[int, ...], check: ExportCheck,
                   what: str) -> None:
    for b in batches:
        xb = _batched(x, b) if b != x.shape[0] else x
        with torch.no_grad():
            expected = module(xb)
        got = run(xb)
        err = _rel(expected, got)
        check.errors[b] = err
        if not err < 1e-3:
            raise ValueError(f"{what}: the exported artifact differs from the module at batch {b} "
                             f"(rel. error {err:.3g}); the model's forward may depend on the batch size")


def to_pt2(module: nn.Module, x: torch.Tensor, path: PathLike, *, dynamic_batch: bool = False,
           max_batch: Optional[int] = None, check: Optional[ExportCheck] = None) -> "torch.export.ExportedProgram":
    """``torch.export`` ``module`` on ``x`` and ``torch.export.save`` the program to ``path``.

    ``dynamic_batch``: accept any batch >= 1 (up to ``max_batch``), else only ``x``'s shape. The
    program is run and compared with ``module`` (batch 1 and 3 when dynamic). Load it with
    ``torch.export.load(path).module()``.
    """
    check = check if check is not None else ExportCheck()
    module = module.eval()
    if dynamic_batch:
        inputs, shapes = batch_dims((x,), max_batch)
        ep = torch.export.export(module, inputs, dynamic_shapes=shapes)
    else:
        ep = torch.export.export(module, (x,))
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    batches = (1, 3) if dynamic_batch and (max_batch is None or max_batch >= 3) else (x.shape[0],)
    _check_batches(module, lambda t: loaded(t), x, batches, check, "to_pt2")
    return ep


def to_onnx(module: nn.Module, x: torch.Tensor, path: PathLike, *, dynamic_batch: bool = False,
            max_batch: Optional[int] = None, check: Optional[ExportCheck] = None) -> list[str]:
    """Export ``module`` on ``x`` to the ONNX file ``path`` (needs ``pip install tucker_fx[export]``).

    FFT-lowered layers are first computed as plain convolutions (:func:`without_fft`); returns
    their names. ``dynamic_batch`` as in :func:`to_pt2`. When onnxruntime is installed, the file is
    run and compared with ``module`` (the errors go into ``check``).
    """
    try:
        import onnxscript  # noqa: F401  (torch's exporter translates through it)
    except ImportError as exc:
        raise ValueError(f"to_onnx needs onnx and onnxscript ({exc}): pip install 'tucker_fx[export]'") from exc
    check = check if check is not None else ExportCheck()
    module = module.eval()
    plain, swapped = without_fft(module)
    if dynamic_batch:
        inputs, shapes = batch_dims((x,), max_batch)
        kwargs: dict[str, Any] = {"dynamic_shapes": shapes}
    else:
        inputs, kwargs = (x,), {}
    try:
        program = torch.onnx.export(plain, inputs, dynamo=True, verbose=False, **kwargs)
    except Exception as exc:
        if "complex" in str(exc):
            raise ValueError(f"to_onnx: torch's ONNX exporter failed on complex-valued tensors. {_COMPLEX_HINT}") from exc
        raise
    program.save(str(path))
    try:
        import onnxruntime as ort
    except ImportError:
        return swapped
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    dtype = x.dtype

    def run(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: t.detach().cpu().numpy()})[0]).to(dtype)

    batches = (1, 3) if dynamic_batch and (max_batch is None or max_batch >= 3) else (x.shape[0],)
    _check_batches(module, run, x, batches, check, "to_onnx")
    return swapped


def default_path(directory: PathLike, fmt: str) -> Path:
    return Path(directory) / f"model.{fmt}"
