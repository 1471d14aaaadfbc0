"""Buffers that a graph writes its large intermediate maps into, kept from one call to the next.

On the CPU, glibc serves each allocation of 32 MB or more with a fresh ``mmap``, and the kernel then
page-faults every 4 kB page of it in as it is first written: measured on this project's 2-core CPU
(one thread), a (32 x 8) @ (8 x 64^3) product took 15.6 ms into a new tensor and 3.7 ms into one
written before. In a compressed 3-D U-Net at 64^3 the full-width maps that the last factors of the
Tucker blocks write are such tensors, on every call.

A :class:`Workspace` holds a few flat buffers, one per *slot*; the pass ``passes.workspace`` gives
each such node of a graph a slot, sharing a slot between nodes whose results are never alive at the
same time (their readers, and the readers of what writes into them in place, are all done). The
kernels that can write into a given tensor (:class:`~tucker_fx.kernels.pointwise.PointwiseConv`,
:class:`~tucker_fx.kernels.pointwise.MixParts`,
:class:`~tucker_fx.kernels.norm_fold.NormedPointwise`) ask :func:`workspace_out` for their output.

It answers None, and the kernel allocates as usual, wherever a reused buffer could be seen: when
autograd records (a later call would overwrite what the backward saved), under ``torch.compile`` or
``torch.export`` (which plan memory themselves), on fake tensors, off the CPU, and where the buffer
and the call disagree on inference mode. Buffers are per thread (two threads may run one model), and
a copy or a pickle of the model starts with none. :meth:`Workspace.clear` gives them back.

Example:
    >>> import torch
    >>> ws = Workspace()
    >>> x = torch.randn(4)
    >>> with torch.no_grad():
    ...     a = ws.take(0, (2, 3), x)
    ...     b = ws.take(0, (3, 2), x)
    >>> a.data_ptr() == b.data_ptr(), tuple(b.shape)
    (True, (3, 2))
    >>> ws.take(0, (2, 3), x.requires_grad_()) is None  # autograd records: no reuse
    True
"""

from __future__ import annotations

import math
import threading
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["Workspace", "pooled", "workspace_out", "WORKSPACE_ATTR", "SLOT_ATTR", "MMAP_BYTES"]

WORKSPACE_ATTR, SLOT_ATTR = "_tucker_workspace", "_tucker_slot"

MMAP_BYTES = 32 << 20
"""glibc's largest dynamic mmap threshold (32 MiB on 64-bit): an allocation this large or larger is a
fresh ``mmap`` on every call, its pages faulted in as they are first written; smaller ones come from
the heap, where freed memory is reused."""


class Workspace:
    """Flat buffers by slot, per thread (see the module docstring)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _buffers(self) -> dict[int, Tensor]:
        bufs = getattr(self._local, "buffers", None)
        if bufs is None:
            bufs = self._local.buffers = {}
        return bufs

    def take(self, slot: int, shape: Sequence[int], like: Tensor, *others: Optional[Tensor]) -> Optional[Tensor]:
        """A contiguous tensor of ``shape`` (``like``'s dtype and device) in slot ``slot``'s buffer, or None
        where a reused buffer could be seen (``others``: the weights, whose ``requires_grad`` counts too)."""
        if torch.compiler.is_compiling() or is_fake(like) or like.device.type != "cpu":
            return None
        if torch.is_grad_enabled() and (like.requires_grad or any(o is not None and o.requires_grad for o in others)):
            return None
        numel = math.prod(int(s) for s in shape)
        bufs = self._buffers()
        buf = bufs.get(slot)
        inference = torch.is_inference_mode_enabled()
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.is_inference() != inference:
            keep = buf.numel() if buf is not None and buf.dtype == like.dtype else 0  # a slot only grows
            buf = bufs[slot] = torch.empty(max(numel, keep), dtype=like.dtype, device=like.device)
        return buf[:numel].view(*shape)

    def clear(self) -> None:
        """Give this thread's buffers back (a later call allocates them again)."""
        self._local = threading.local()

    def nbytes(self) -> int:
        """Bytes this thread's buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._buffers().values())

    def __deepcopy__(self, memo: dict) -> "Workspace":
        return Workspace()  # deepcopy's memo gives every module of the copy this one new workspace

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"Workspace({len(self._buffers())} buffers in this thread, {self.nbytes() / 2**20:.1f} MiB)"


def pooled(module: nn.Module) -> bool:
    """``module`` has a workspace slot and may use it now: checked before a kernel reads its input's
    sizes as ints (under ``torch.compile``/``torch.export`` that would specialise a dynamic dim)."""
    return module.__dict__.get(WORKSPACE_ATTR) is not None and not torch.compiler.is_compiling()


def workspace_out(module: nn.Module, shape: Sequence[int], like: Tensor, *others: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor ``module`` should write its output of ``shape`` into, from the workspace slot the
    pass ``passes.workspace`` gave it; None (allocate as usual) where it has none or may not reuse."""
    ws = module.__dict__.get(WORKSPACE_ATTR)
    if ws is None:
        return None
    return ws.take(module.__dict__[SLOT_ATTR], shape, like, *others)
