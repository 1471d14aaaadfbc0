"""Graph pass: a block's 3-d core conv runs on channels-last data, converted for free by its factors.

mkldnn runs a narrow 3x3x3 conv faster on channels_last_3d data (one thread, 64^3: 8 -> 8 17.1 ->
12.7 ms, 16 -> 16 48.0 -> 24.3 ms), but converting a map costs as much as it saves. Inside a Tucker
block nothing needs converting: the first factor's product can write positions x channels (the same
``mm`` with its operands transposed) and the last factor's can read it, writing the usual layout. Whole
blocks (first, core, last), one thread: 32 -> 8 -> 8 -> 32 at 64^3 42.6 -> 26.2 ms, 64 -> 16 -> 16 -> 64
at 32^3 6.4 -> 5.2 ms and on 16 x 56 x 56 11.4 -> 8.8 ms; but at 16^3 0.37 -> 0.45 ms and with 4-channel
cores (16 -> 4 -> 4 -> 16 at 64^3) 10.6 -> 10.8 ms, hence the rule below.

Applies to ``first -> core -> last`` where ``first`` is a stride-1
:class:`~tucker_fx.kernels.pointwise.PointwiseConv` read only by the core, the core a 3-d conv
(``nn.Conv3d`` or :class:`~tucker_fx.kernels.pointwise.MkldnnConv`; a plain conv becomes the latter,
which keeps the channels-last layout) read only by ``last``, a stride-1 ``PointwiseConv`` or
:class:`~tucker_fx.kernels.norm_fold.NormedPointwise`; batch 1, at least :data:`MIN_POSITIONS`
positions, both core ranks at least :data:`MIN_RANK`. Each module must be called at one place. Exact
up to rounding (the same products, summed in another order); eager on the CPU only (under
``torch.compile``/``torch.export`` the kernels keep their usual layout).

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis.shapes import propagate_shapes
    >>> from tucker_fx.kernels.pointwise import PointwiseConv
    >>> from tucker_fx.passes.channels_last_cores import ChannelsLastCores
    >>> net = nn.Sequential(nn.Conv3d(16, 8, 1), nn.Conv3d(8, 8, 3, padding=1), nn.Conv3d(8, 16, 1)).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> for name in ("0", "2"):
    ...     setattr(gm, name, PointwiseConv.from_conv(net.get_submodule(name)))
    >>> x = torch.randn(1, 16, 32, 32, 32)
    >>> _ = propagate_shapes(gm, (x,))
    >>> ChannelsLastCores()(gm).modified, gm.get_submodule("0").layout, type(gm.get_submodule("1")).__name__
    (True, 'to_channels_last', 'MkldnnConv')
    >>> with torch.no_grad():
    ...     bool(torch.allclose(gm(x), net(x), atol=1e-4)), gm(x).is_contiguous()
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.kernels.norm_fold import NormedPointwise
from tucker_fx.kernels.pointwise import MkldnnConv, PointwiseConv, mkldnn_eligible
from tucker_fx.passes.runner import PassResult

__all__ = ["ChannelsLastCores", "MIN_POSITIONS", "MIN_RANK"]

MIN_POSITIONS = 32 ** 3
"""Fewer positions: the transposed products cost more than the core saves (16^3: 0.37 -> 0.45 ms)."""
MIN_RANK = 8
"""Narrower cores: no gain measured (16 -> 4 -> 4 -> 16 at 64^3: 10.6 -> 10.8 ms)."""


def _shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _single_input(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs


@dataclass
class ChannelsLastCores:
    """Channels-last core convs between their factors (see the module docstring)."""

    name: str = "channels_last_cores"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        sites: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sites[str(node.target)] = sites.get(str(node.target), 0) + 1
        done: list[str] = []
        for core in list(gm.graph.nodes):
            if not _single_input(core) or len(core.users) != 1:
                continue
            first, last = core.args[0], next(iter(core.users))
            if not (_single_input(first) and _single_input(last) and list(first.users) == [core]):
                continue
            if any(sites[str(n.target)] != 1 for n in (first, core, last)):
                continue
            f, c, l = (gm.get_submodule(str(n.target)) for n in (first, core, last))
            conv3d = isinstance(c, nn.Conv3d) and mkldnn_eligible(c)
            if not (isinstance(f, PointwiseConv) and (conv3d or (isinstance(c, MkldnnConv) and c.weight.dim() == 5))
                    and isinstance(l, (PointwiseConv, NormedPointwise))):
                continue
            if any(s != 1 for s in f.stride) or (isinstance(l, PointwiseConv) and any(s != 1 for s in l.stride)):
                continue
            if f.layout != "keep" or (isinstance(l, PointwiseConv) and l.layout != "keep"):
                continue
            shape = _shape(core)
            if shape is None or shape[0] != 1 or math.prod(shape[2:]) < MIN_POSITIONS:
                continue
            if min(c.weight.shape[0], c.weight.shape[1]) < MIN_RANK:
                continue
            f.layout = "to_channels_last"
            if isinstance(l, PointwiseConv):
                l.layout = "to_contiguous"  # NormedPointwise reads a channels-last input as it is
            if conv3d:
                parent, _, leaf = str(core.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, MkldnnConv(c))
            done.append(str(core.target))
        if done:
            gm.recompile()
            gm.meta.setdefault(NOTES_KEY, []).append("core convs on channels-last data between their factors: "
                                                     + ", ".join(done))
        return PassResult(gm, bool(done))
