"""Graph pass: large maps made by the package's 1x1 kernels are written into reused buffers.

See :mod:`tucker_fx.kernels.workspace` for why (page faults on every fresh allocation of 32 MB or
more). This pass plans the buffers, as a compiler plans memory:

1. the candidates are the nodes of :class:`~tucker_fx.kernels.pointwise.PointwiseConv`,
   :class:`~tucker_fx.kernels.pointwise.MixParts` and :class:`~tucker_fx.kernels.norm_fold.NormedPointwise`
   (each called at one place in the graph) whose result is at least ``min_bytes``;
2. a candidate's value lives until the last reader of it or of anything that may be it or a view of
   it: what writes into it in place (an in-place norm, activation or add, found by ``passes.inplace``),
   an eval-mode dropout (which returns its input: MONAI's BasicUNet has one after every conv), a view,
   an ATen op that may alias its input. Every reader must be one of those or an op known to return a
   new tensor, so that no view of the buffer can outlive the last one, and none may be the graph's
   output (a value the caller keeps must be a tensor of its own);
3. values whose lives do not overlap share a slot (greedy, in graph order), so the buffers held
   between calls are about the largest set of these maps alive at one time, not their sum.

The modules get the :class:`~tucker_fx.kernels.workspace.Workspace` and their slot as attributes
(``_tucker_workspace``, ``_tucker_slot``): the graph and the state dict do not change. Exact: the
same products, written elsewhere.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.pointwise import PointwiseConv
    >>> from tucker_fx.passes.workspace import PlanWorkspace
    >>> from tucker_fx.kernels.workspace import SLOT_ATTR
    >>> net = nn.Sequential(nn.Conv3d(4, 16, 1), nn.ReLU(inplace=True), nn.Conv3d(16, 16, 1)).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> for name in ("0", "2"):
    ...     setattr(gm, name, PointwiseConv.from_conv(net.get_submodule(name)))
    >>> x = torch.randn(1, 4, 8, 8, 8)
    >>> ref = gm(x)
    >>> from tucker_fx.analysis.shapes import propagate_shapes
    >>> _ = propagate_shapes(gm, (x,))  # the pass reads node.meta["tensor_meta"]
    >>> PlanWorkspace(min_bytes=0)(gm).modified  # "0" (and the ReLU in place) gets a slot; "2" is the output
    True
    >>> getattr(gm.get_submodule("0"), SLOT_ATTR), hasattr(gm.get_submodule("2"), SLOT_ATTR)
    (0, False)
    >>> with torch.no_grad():
    ...     bool(torch.equal(gm(x), ref)), bool(torch.equal(gm(x), ref))
    (True, True)
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.kernels.norm_fold import NormedPointwise
from tucker_fx.kernels.pointwise import MixParts, PointwiseConv
from tucker_fx.kernels.workspace import MMAP_BYTES, SLOT_ATTR, WORKSPACE_ATTR, Workspace
from tucker_fx.passes.inplace import returns_new_buffer, writes_into_input
from tucker_fx.passes.runner import PassResult

__all__ = ["PlanWorkspace", "MIN_BYTES"]

MIN_BYTES = MMAP_BYTES
"""Maps smaller than this (32 MiB, glibc's largest mmap threshold) come from the heap, where malloc
hands back a recently freed, cache-warm chunk: a fixed slot does worse. Measured one thread, in-house
ResNet3d-18 (maps up to 12.8 MB) with the workspace from 1 MiB up: 102.7 ms against 97.1 without."""

_KERNELS = (PointwiseConv, MixParts, NormedPointwise)


def _bytes(node: fx.Node) -> Optional[int]:
    meta = node.meta.get("tensor_meta")
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    if shape is None or dtype is None:
        return None
    return math.prod(int(s) for s in shape) * dtype.itemsize


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)
_ALIASING_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      operator.getitem}
_VIEW_METHODS = {"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
                 "transpose", "contiguous", "narrow", "expand", "expand_as", "detach", "__getitem__", "chunk", "split",
                 "unbind", "select", "type_as", "to", "float"}


def _may_alias(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` returns its input, a view of it or a new tensor, and keeps no other reference: an
    eval-mode dropout (the input itself), a view, an ATen op (it can only alias its arguments)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _DROPOUTS)
    if node.op == "call_function":
        return isinstance(node.target, torch._ops.OpOverload) or node.target in _ALIASING_FUNCTIONS
    return node.op == "call_method" and str(node.target) in _VIEW_METHODS


def _last_use(gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]) -> Optional[int]:
    """Where ``node``'s buffer is last read, following in-place writers of it; None where a reader
    might keep a view of it (unknown op) or the graph returns it."""
    last, todo, seen = order[node], [node], {node}
    while todo:
        value = todo.pop()
        for user in value.users:
            if user.op == "output":
                return None
            last = max(last, order[user])
            if writes_into_input(gm, user):
                if user.args and user.args[0] is value and user not in seen:
                    seen.add(user)
                    todo.append(user)  # its result is this buffer
                # else it reads this value into its own first argument's buffer: a reader
            elif returns_new_buffer(gm, user):
                continue
            elif _may_alias(gm, user):
                if user not in seen:  # its result may be this buffer or a view of it: it lives on there
                    seen.add(user)
                    todo.append(user)
            else:
                return None
    return last


@dataclass
class PlanWorkspace:
    """Buffers reused from call to call for the large maps of the 1x1 kernels (see the module docstring)."""

    min_bytes: Optional[int] = None  # None: MIN_BYTES
    name: str = "plan_workspace"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        sites: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sites[str(node.target)] = sites.get(str(node.target), 0) + 1
        lives: list[tuple[fx.Node, int, int]] = []
        for node in gm.graph.nodes:
            if node.op != "call_module" or sites[str(node.target)] != 1:
                continue
            if not isinstance(gm.get_submodule(str(node.target)), _KERNELS):
                continue
            size = _bytes(node)
            if size is None or size < (MIN_BYTES if self.min_bytes is None else self.min_bytes):
                continue
            last = _last_use(gm, node, order)
            if last is not None:
                lives.append((node, last, size))
        if not lives:
            return PassResult(gm, False)
        workspace = Workspace()
        slot_free_after: list[int] = []  # per slot: the position after which it is free again
        slot_bytes: list[int] = []
        for node, last, size in lives:
            free = [s for s, end in enumerate(slot_free_after) if end < order[node]]
            # the free slot closest in size above, else the largest free one (it grows), else a new one
            fits = [s for s in free if slot_bytes[s] >= size]
            if fits:
                slot = min(fits, key=lambda s: slot_bytes[s])
            elif free:
                slot = max(free, key=lambda s: slot_bytes[s])
            else:
                slot = len(slot_free_after)
                slot_free_after.append(0)
                slot_bytes.append(0)
            slot_free_after[slot], slot_bytes[slot] = last, max(slot_bytes[slot], size)
            module = gm.get_submodule(str(node.target))
            setattr(module, WORKSPACE_ATTR, workspace)
            setattr(module, SLOT_ATTR, slot)
        total, held = sum(size for _, _, size in lives), sum(slot_bytes)
        gm.meta.setdefault(NOTES_KEY, []).append(
            f"{len(lives)} maps of the 1x1 kernels ({total / 2**20:.0f} MiB a call) written into {len(slot_bytes)} "
            f"reused buffers ({held / 2**20:.0f} MiB held between calls)")
        return PassResult(gm, True)
