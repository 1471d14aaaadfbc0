"""Graph pass: a GroupNorm/InstanceNorm after a 1x1 conv is computed from the conv's narrow input.

A decomposed ``conv -> norm`` is ``first -> core -> last -> norm``, and ``last`` widens R channels
to C. The norm's statistics follow from the R-channel core output, so the pair becomes one
:class:`~tucker_fx.kernels.norm_fold.NormedPointwise`: the full-width map is made once, already
normalised, instead of made, read twice and rewritten (the norms at full width were the largest
nodes left in the compressed MONAI DynUNet and SegResNet; see ``docs/benchmarks.md``).

Applies where a stride-1 :class:`~tucker_fx.kernels.pointwise.PointwiseConv` with one input has the
norm as its only reader, and the conv at least doubles the channel count (R <= C/2: measured
one thread, 8 -> 32 channels at 64^3 37.7 -> 20.1 ms, 4 -> 16 with GroupNorm 9.8 -> 8.6, but 32 -> 32
43.9 -> 47.4, where the R x R statistics and the extra pass over the input cost more than they save). Exact up to rounding; the new
node carries the norm's ``tensor_meta``.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.pointwise import PointwiseConv
    >>> from tucker_fx.passes.norm_fold import FoldNormIntoPointwise
    >>> net = nn.Sequential(nn.Conv3d(4, 16, 1), nn.InstanceNorm3d(16), nn.ReLU()).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> setattr(gm, "0", PointwiseConv.from_conv(net[0]))  # as the pass fast_kernels leaves it
    >>> x = torch.randn(1, 4, 6, 6, 6)
    >>> ref = gm(x)
    >>> FoldNormIntoPointwise()(gm).modified, [n.op for n in gm.graph.nodes]
    (True, ['placeholder', 'call_module', 'call_module', 'output'])
    >>> bool(torch.allclose(gm(x), ref, atol=1e-5))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from tucker_fx._internal.graph import free_attr_name
from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, OpCost, conv_macs
from tucker_fx.kernels.norm_fold import NormedPointwise, foldable_norm
from tucker_fx.kernels.pointwise import PointwiseConv
from tucker_fx.passes.runner import PassResult

__all__ = ["FoldNormIntoPointwise"]


@dataclass
class FoldNormIntoPointwise:
    """A norm read off its 1x1 conv's input (see the module docstring)."""

    name: str = "fold_norm_into_pointwise"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        done: list[str] = []
        fused: dict[tuple[str, str], str] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            conv_node = node.args[0]
            if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module" and list(conv_node.users) == [node]
                    and len(conv_node.args) == 1 and not conv_node.kwargs):
                continue
            norm, conv = gm.get_submodule(str(node.target)), gm.get_submodule(str(conv_node.target))
            if not isinstance(conv, PointwiseConv) or any(s != 1 for s in conv.stride) or foldable_norm(norm) is None:
                continue
            out_c, in_c = conv.weight.shape[:2]
            if 2 * in_c > out_c:
                continue
            try:
                module = NormedPointwise(conv, norm)
            except ValueError:
                continue  # channel counts that do not match: the graph would fail as it is; leave it be
            key = (str(conv_node.target), str(node.target))
            if key not in fused:
                fused[key] = free_attr_name(gm, str(conv_node.target).replace(".", "_") + "_normed")
                gm.add_submodule(fused[key], module)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(fused[key], (conv_node.args[0],))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            gm.graph.erase_node(conv_node)
            done.append(f"{conv_node.name} + {node.name}")
        if done:
            gm.graph.lint()
            # the conv and the norm stay registered (a block's per-layer check calls it whole); the new
            # module holds the same Parameters, so nothing is duplicated or trained apart
            gm.recompile()
            gm.meta.setdefault(NOTES_KEY, []).append("norms computed from their 1x1 conv's input: " + ", ".join(done))
        return PassResult(gm, bool(done))


@REGISTRY.register(NormedPointwise)
def _normed_pointwise_cost(ctx: CostContext) -> OpCost:
    """The product, plus the R x R Gram matrix of the centred input (its MACs); the norm's
    elementwise work (centring, scaling) is a few flops per input and output element."""
    assert isinstance(ctx.module, NormedPointwise) and ctx.out_shape is not None and ctx.in_shapes[0] is not None
    n, r = ctx.in_shapes[0][:2]
    positions = math.prod(ctx.in_shapes[0][2:])
    return OpCost("conv", macs=conv_macs(ctx.out_shape, tuple(ctx.module.weight.shape)) + n * r * r * positions,
                  other_flops=3 * n * r * positions)
