"""Graph pass: a channel concatenation read only by 1x1 convs is never built.

A U-Net decoder concatenates the up-sampled map with the skip connection and convolves the result.
Once that conv is decomposed, the concatenation's only reader is the block's first factor, a 1x1
conv (:class:`~tucker_fx.kernels.pointwise.PointwiseConv` after the ``fast_kernels`` stage), and
``W @ cat(a, b) = W_a @ a + W_b @ b``. The pass hands the parts to the 1x1 conv, which sums one
product per part into its output. Measured in the node profile of the compressed MONAI DynUNet and
BasicUNet (one thread): the ``cat`` of 2 x 32 channels at 64^3 took 26 ms, most of it page faults on
the 67 MB result; cat + product 40.4 ms against 8.7 ms for the split products.

It applies where every user of a ``torch.cat`` (or ``aten.cat``) along dimension 1 is a
``PointwiseConv`` called on it alone; anything else that reads the concatenation keeps it. Exact
(the same products, summed in another order).

Then, where a part is made by a stride = kernel up-conv
(:class:`~tucker_fx.kernels.conv_transpose.PatchConvTranspose`) that nothing else reads, and the 1x1
conv has fewer outputs than the up-conv, the part's block of the 1x1 conv moves into the up-conv
(``W_a (W_t x + b_t) = (W_a W_t) x + W_a b_t``, per output voxel): the up-conv makes R channels
instead of C, and the 1x1 conv becomes :class:`~tucker_fx.kernels.pointwise.MixParts`, which adds that
part as it is. DynUNet's last up-conv (64 -> 32 channels, 32^3 -> 64^3, 37.8 ms in the node profile)
then writes 16 channels. Exact up to float rounding (the product of the two weights is formed in
float64).

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.pointwise import PointwiseConv
    >>> from tucker_fx.passes.cat_pointwise import CatIntoPointwise
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mix = PointwiseConv(torch.randn(4, 6, 1, 1), None, (1, 1))
    ...     def forward(self, a, b):
    ...         return self.mix(torch.cat([a, b], dim=1))
    >>> class Leaf(torch.fx.Tracer):  # the graphs of fast_kernels call PointwiseConv as a module
    ...     def is_leaf_module(self, m, name):
    ...         return isinstance(m, PointwiseConv) or super().is_leaf_module(m, name)
    >>> net = Net()
    >>> gm = torch.fx.GraphModule(net, Leaf().trace(net))
    >>> a, b = torch.randn(1, 2, 5, 5), torch.randn(1, 4, 5, 5)
    >>> ref = gm(a, b)
    >>> CatIntoPointwise()(gm).modified, any(n.target is torch.cat for n in gm.graph.nodes)
    (True, False)
    >>> bool(torch.allclose(gm(a, b), ref, atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, OpCost, conv_macs
from tucker_fx.kernels.conv_transpose import PatchConvTranspose
from tucker_fx.kernels.pointwise import MixParts, PointwiseConv
from tucker_fx.passes.runner import PassResult

__all__ = ["CatIntoPointwise"]

_CATS = {torch.cat, torch.concat, torch.ops.aten.cat.default}


def _cat_parts(node: fx.Node) -> Optional[list[fx.Node]]:
    """The tensors ``node`` concatenates along dimension 1 (``None`` if it is not such a cat)."""
    if node.op != "call_function" or node.target not in _CATS or not node.args:
        return None
    parts = node.args[0]
    dim: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not all(isinstance(p, fx.Node) for p in parts):
        return None
    meta = node.meta.get("tensor_meta")
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    if not isinstance(dim, int) or set(node.kwargs) - {"dim"}:
        return None
    if dim != 1 and (dim >= 0 or rank is None or dim % rank != 1):
        return None
    return list(parts)


def _merge_up_conv(gm: fx.GraphModule, user: fx.Node) -> Optional[str]:
    """Move the block of ``user`` (a PointwiseConv on parts) for a part made by a PatchConvTranspose into
    that up-conv (see the module docstring); a note, or ``None`` where it does not apply."""
    mix = gm.get_submodule(str(user.target))
    if not isinstance(mix, PointwiseConv) or any(s != 1 for s in mix.stride):
        return None
    if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == user.target) != 1:
        return None  # a shared 1x1 conv: its weight must stay whole
    offsets, start = [], 0
    for part in user.args:
        meta = part.meta.get("tensor_meta") if isinstance(part, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            return None
        offsets.append((start, start + int(meta.shape[1])))
        start += int(meta.shape[1])
    if start != mix.weight.shape[1]:
        return None
    rows = mix.weight.shape[0]
    for j, part in enumerate(user.args):
        if not (isinstance(part, fx.Node) and part.op == "call_module" and list(part.users) == [user]
                and user.args.count(part) == 1):
            continue
        up = gm.get_submodule(str(part.target))
        if not isinstance(up, PatchConvTranspose) or rows >= up.weight.shape[1]:
            continue
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == part.target) != 1:
            continue
        lo, hi = offsets[j]
        w = mix.weight.detach().reshape(rows, -1).double()
        w_a = w[:, lo:hi]
        w_up = torch.einsum("rc,ic...->ir...", w_a, up.weight.detach().double())
        b_up = w_a @ up.bias.detach().double() if up.bias is not None else None
        if mix.bias is not None:
            b_up = mix.bias.detach().double() if b_up is None else b_up + mix.bias.detach().double()
        like = up.weight
        new_up = PatchConvTranspose(w_up.to(like.dtype), None if b_up is None else b_up.to(like.dtype))
        rest = torch.cat([w[:, :lo], w[:, hi:]], dim=1).to(mix.weight.dtype)
        new_mix = MixParts(rest.reshape(rows, -1, *mix.weight.shape[2:]), None, keep=j)
        for module in (new_up, new_mix):
            for p in module.parameters():
                p.requires_grad_(like.requires_grad)
        for target, module in ((str(part.target), new_up), (str(user.target), new_mix)):
            parent, _, leaf = target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
        parent = gm.get_submodule(str(user.target).rpartition(".")[0]) if "." in str(user.target) else None
        if parent is not None and hasattr(parent, "partial"):
            parent.partial = True  # a Tucker block whose first map lives partly in the up-conv now
        meta = part.meta["tensor_meta"]  # the up-conv now makes `rows` channels
        shape = torch.Size((meta.shape[0], rows, *meta.shape[2:]))
        part.meta["tensor_meta"] = meta._replace(shape=shape, stride=torch.empty(shape, device="meta").stride())
        return (f"{part.target}: its {up.weight.shape[1]} output channels mixed to {rows} inside it "
                f"({user.target} adds them as they are)")
    return None


@dataclass
class CatIntoPointwise:
    """Feed the parts of a channel ``cat`` to the 1x1 convs that are its only readers (see the module docstring)."""

    name: str = "cat_into_pointwise"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        done = []
        for node in list(gm.graph.nodes):
            parts = _cat_parts(node)
            if parts is None or not node.users:
                continue
            users = list(node.users)
            if not all(u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), PointwiseConv)
                       and u.args == (node,) and not u.kwargs for u in users):
                continue
            for u in users:
                u.args = tuple(parts)
            gm.graph.erase_node(node)
            done.append(f"{node.name} -> {', '.join(str(u.target) for u in users)}")
            for u in users:
                merged = _merge_up_conv(gm, u)
                if merged:
                    done.append(merged)
        if done:
            gm.graph.lint()
            gm.recompile()
            gm.meta.setdefault(NOTES_KEY, []).append("channel concatenations fed part by part to their 1x1 convs: "
                                                     + "; ".join(done))
        return PassResult(gm, bool(done))


@REGISTRY.register(MixParts)
def _mix_parts_cost(ctx: CostContext) -> OpCost:
    assert isinstance(ctx.module, MixParts) and ctx.out_shape is not None
    return OpCost("conv", macs=conv_macs(ctx.out_shape, tuple(ctx.module.weight.shape)))
