"""Graph pass: a pad of zero width is the identity; drop it.

Exported U-Nets pad a skip connection to the upsampled size, ``F.pad(x, [0, 0, 0, 0, 0, 0],
"replicate")`` once the sizes already match: in eager mode that is a full copy. Measured in the node
profile of the compressed MONAI BasicUNet (one thread, 1 x 32 x 64^3): 17.7 ms of 440. The pass
removes such pads where that cannot be seen: the padded tensor is computed in the graph (not an
input of the model) and has no other user, so no later in-place op can reach anything else.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from tucker_fx.passes.noop_pads import DropNoOpPads
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         return F.pad(x * 2, [0, 0, 0, 0], mode="replicate") + 1
    >>> gm = torch.fx.symbolic_trace(Net())
    >>> DropNoOpPads()(gm).modified, [n.target for n in gm.graph.nodes if "pad" in str(n.target)]
    (True, [])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.passes.runner import PassResult

__all__ = ["DropNoOpPads"]

_PADS = {F.pad, torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default,
         torch.ops.aten.replication_pad1d.default, torch.ops.aten.replication_pad2d.default,
         torch.ops.aten.replication_pad3d.default, torch.ops.aten.reflection_pad1d.default,
         torch.ops.aten.reflection_pad2d.default, torch.ops.aten.reflection_pad3d.default}


def _widths(node: fx.Node) -> Any:
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("pad", node.kwargs.get("padding"))


@dataclass
class DropNoOpPads:
    """Remove pads whose widths are all zero (see the module docstring for when)."""

    name: str = "drop_noop_pads"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        dropped = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _PADS or not node.args:
                continue
            src, widths = node.args[0], _widths(node)
            if not isinstance(src, fx.Node) or src.op in ("placeholder", "get_attr") or len(src.users) != 1:
                continue
            if not isinstance(widths, (list, tuple)) or not all(isinstance(w, int) and w == 0 for w in widths):
                continue
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            dropped.append(node.name)
        if dropped:
            gm.recompile()
            gm.meta.setdefault(NOTES_KEY, []).append(f"zero-width pads dropped: {', '.join(dropped)}")
        return PassResult(gm, bool(dropped))
