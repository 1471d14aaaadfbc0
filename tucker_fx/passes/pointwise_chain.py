"""Graph pass: 1x1 products fused with their neighbours on the native kernel.

1. A widening 1x1 product, a ReLU/LeakyReLU and a narrowing 1x1 product become one node.

After a decomposition, ``conv -> [norm] -> act -> conv`` is ``... -> last -> [norm] -> act ->
first -> ...``: ``last`` widens a core's R1 channels to C, ``first`` narrows them to R2, and the
C-channel map between them is written, activated in place and read again, at full width, the
work a decomposition does not cut. Where ``last`` (a :class:`~tucker_fx.kernels.pointwise.PointwiseConv`
or, with the norm folded in, a :class:`~tucker_fx.kernels.norm_fold.NormedPointwise`) is read
only by the activation and the activation only by ``first``, the three nodes become one
:class:`~tucker_fx.kernels.pointwise_chain.PointwiseChain`, computed on the native kernel without
the wide map (``kernels/pointwise_chain.py`` has the measurements). Applies where C is at least
twice R1 and R2 (a wide map to avoid).

2. A 1x1 product read only by an add of a tensor of its own shape (a block's last factor and the
residual sum) becomes one :class:`~tucker_fx.kernels.pointwise_chain.PointwiseAdd`, and a trilinear
x2 up-sampling so read (a decoder's skip connection) one
:class:`~tucker_fx.kernels.pointwise_chain.UpsampleAdd`; each is written into the other operand
where the graph owns it and nothing else reads it (``passes.inplace``'s rule).

3. A GroupNorm or InstanceNorm (no running statistics), read only by a ReLU/LeakyReLU read only by
a 1x1 product that narrows (C >= 2 R), becomes one
:class:`~tucker_fx.kernels.pointwise_chain.NormActPointwise`: a pre-activation block's head.

All apply only where the native kernel runs here (:func:`tucker_fx.kernels.native.available`;
the rules are then deterministic, so ``tucker_fx.load`` rebuilds the same graph on this machine).
Exact up to rounding; the new node carries the ``tensor_meta`` of the node it replaces.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis.shapes import propagate_shapes
    >>> from tucker_fx.passes.fast_kernels import UseFastKernels
    >>> from tucker_fx.passes.pointwise_chain import FusePointwiseChains
    >>> net = nn.Sequential(nn.Conv3d(4, 16, 1), nn.ReLU(), nn.Conv3d(16, 4, 1)).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> x = torch.randn(1, 4, 8, 8, 8)
    >>> propagate_shapes(gm, (x,))
    >>> _ = UseFastKernels()(gm)
    >>> from tucker_fx.kernels import native
    >>> FusePointwiseChains()(gm).modified == native.available()
    True
    >>> bool(torch.allclose(gm(x), net(x), atol=1e-5))
    True
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.graph import free_attr_name
from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, OpCost
from tucker_fx.kernels import native
from tucker_fx.kernels.norm_fold import NormedPointwise, foldable_norm
from tucker_fx.kernels.pointwise import PointwiseConv
from tucker_fx.kernels.pointwise_chain import (NormActPointwise, PointwiseAdd, PointwiseChain, UpsampleAdd,
                                               activation_slope)
from tucker_fx.kernels.resample import SeparableInterpolate
from tucker_fx.passes.inplace import only_reader, owns_buffer
from tucker_fx.passes.runner import PassResult

__all__ = ["FusePointwiseChains"]

_ADDS = {operator.add, torch.add, torch.ops.aten.add.Tensor}


def _single_module_call(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs
            and isinstance(node.args[0], fx.Node))


@dataclass
class FusePointwiseChains:
    """``first -> act -> second`` 1x1 chains as one native node (see the module docstring)."""

    name: str = "fuse_pointwise_chains"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if not native.available():
            return PassResult(gm, False)
        done: list[str] = []
        for act_node in list(gm.graph.nodes):
            if not _single_module_call(act_node) or len(act_node.users) != 1:
                continue
            first_node, second_node = act_node.args[0], next(iter(act_node.users))
            if not (_single_module_call(first_node) and list(first_node.users) == [act_node]
                    and _single_module_call(second_node) and second_node.args[0] is act_node):
                continue
            act = gm.get_submodule(str(act_node.target))
            first, second = gm.get_submodule(str(first_node.target)), gm.get_submodule(str(second_node.target))
            if activation_slope(act) is None:
                continue
            if foldable_norm(first) is not None and isinstance(second, PointwiseConv):
                if 2 * second.weight.shape[0] <= second.weight.shape[1] and second.weight.shape[0] <= native.MAX_CHAIN[2] \
                        and second.weight.shape[1] <= native.MAX_CHAIN[1]:
                    try:
                        module = NormActPointwise(first, act, second)
                    except ValueError:
                        continue
                    self._replace(gm, (first_node, act_node, second_node), module, "_normed_act")
                    done.append(f"{first_node.name} -> {act_node.name} -> {second_node.name}")
                continue
            if not isinstance(first, (PointwiseConv, NormedPointwise)):
                continue
            if not isinstance(second, PointwiseConv):
                continue
            r1, c, r2 = first.weight.shape[1], first.weight.shape[0], second.weight.shape[0]
            if c < 2 * max(r1, r2) or any(a > b for a, b in zip((r1, c, r2), native.MAX_CHAIN)):
                continue
            try:
                module = PointwiseChain(first, act, second)
            except ValueError:
                continue  # strided or relaid-out products (channels_last_cores): left as they are
            self._replace(gm, (first_node, act_node, second_node), module, "_chain")
            done.append(f"{first_node.name} -> {act_node.name} -> {second_node.name}")
        added = self._residual_adds(gm)
        if done or added:
            gm.graph.lint()
            # the modules stay registered (a block's per-layer check calls them); the fused modules
            # hold them, so nothing is duplicated or trained apart
            gm.recompile()
            notes = gm.meta.setdefault(NOTES_KEY, [])
            if done:
                notes.append("norm or 1x1 -> activation -> 1x1 chains on the native kernel, the wide map never "
                             "written: " + ", ".join(done))
            if added:
                notes.append("1x1 products or x2 up-samplings and the add after them in one native pass: "
                             + ", ".join(added))
        return PassResult(gm, bool(done or added))

    @staticmethod
    def _replace(gm: fx.GraphModule, nodes: tuple[fx.Node, fx.Node, fx.Node], module: nn.Module, suffix: str) -> None:
        """``nodes`` (a chain, each read only by the next) as one call of ``module``."""
        first_node, act_node, second_node = nodes
        name = free_attr_name(gm, str(second_node.target).replace(".", "_") + suffix)
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(second_node):
            new = gm.graph.call_module(name, (first_node.args[0],))
        new.meta.update(second_node.meta)
        second_node.replace_all_uses_with(new)
        for n in (second_node, act_node, first_node):
            gm.graph.erase_node(n)

    @staticmethod
    def _residual_adds(gm: fx.GraphModule) -> list[str]:
        added: list[str] = []
        for add in list(gm.graph.nodes):
            if not (add.op == "call_function" and add.target in _ADDS and len(add.args) == 2 and not add.kwargs):
                continue
            for conv_node, skip in (add.args, add.args[::-1]):
                if not (_single_module_call(conv_node) and list(conv_node.users) == [add] and isinstance(skip, fx.Node)):
                    continue
                conv = gm.get_submodule(str(conv_node.target))
                out_meta, skip_meta = conv_node.meta.get("tensor_meta"), skip.meta.get("tensor_meta")
                in_meta = conv_node.args[0].meta.get("tensor_meta")
                if not (out_meta is not None and skip_meta is not None and tuple(out_meta.shape) == tuple(skip_meta.shape)
                        and out_meta.dtype == skip_meta.dtype):
                    continue
                inplace = only_reader(skip, add) and owns_buffer(gm, skip)
                if isinstance(conv, PointwiseConv) and conv.weight.shape[1] <= native.MAX_CHAIN[1]:
                    try:
                        module: nn.Module = PointwiseAdd(conv, inplace=inplace)
                    except ValueError:
                        continue
                elif (isinstance(conv, SeparableInterpolate) and conv.mode == "trilinear" and not conv.align_corners
                      and in_meta is not None and len(in_meta.shape) == 5
                      and tuple(out_meta.shape) == tuple(in_meta.shape[:2]) + tuple(2 * s for s in in_meta.shape[2:])):
                    module = UpsampleAdd(conv, inplace=inplace)
                else:
                    continue
                name = free_attr_name(gm, str(conv_node.target).replace(".", "_") + "_add")
                gm.add_submodule(name, module)
                with gm.graph.inserting_before(add):
                    new = gm.graph.call_module(name, (conv_node.args[0], skip))
                new.meta.update(add.meta)
                add.replace_all_uses_with(new)
                gm.graph.erase_node(add)
                gm.graph.erase_node(conv_node)
                added.append(f"{conv_node.name} + {skip.name}" + (" (in place)" if module.inplace else ""))
                break
        return added


@REGISTRY.register(PointwiseChain)
def _chain_cost(ctx: CostContext) -> OpCost:
    """The two products (and a folded norm's Gram matrix), as the three nodes counted them."""
    assert isinstance(ctx.module, PointwiseChain) and ctx.in_shapes and ctx.in_shapes[0] is not None
    n, r1 = ctx.in_shapes[0][:2]
    positions = n * math.prod(ctx.in_shapes[0][2:])
    m = ctx.module
    c, r2 = m.first.weight.shape[0], m.second.weight.shape[0]
    macs = positions * c * (r1 + r2)
    other = positions * c  # the activation
    if isinstance(m.first, NormedPointwise):
        macs += positions * r1 * r1
        other += 3 * positions * r1
    return OpCost("conv", macs=macs, other_flops=other)


@REGISTRY.register(PointwiseAdd)
def _pointwise_add_cost(ctx: CostContext) -> OpCost:
    """The product and the add, as the two nodes counted them."""
    assert isinstance(ctx.module, PointwiseAdd) and ctx.out_shape is not None
    w = ctx.module.pointwise.weight
    outputs = math.prod(ctx.out_shape)
    return OpCost("conv", macs=outputs * w.shape[1], other_flops=outputs)


@REGISTRY.register(NormActPointwise)
def _norm_act_pointwise_cost(ctx: CostContext) -> OpCost:
    """The product, and the norm's and the activation's elementwise work (a few flops an input)."""
    assert isinstance(ctx.module, NormActPointwise) and ctx.in_shapes and ctx.in_shapes[0] is not None
    inputs = math.prod(ctx.in_shapes[0])
    w = ctx.module.pointwise.weight
    return OpCost("conv", macs=inputs * w.shape[0], other_flops=5 * inputs)


@REGISTRY.register(UpsampleAdd)
def _upsample_add_cost(ctx: CostContext) -> OpCost:
    """The up-sampling and the add, as the two nodes counted them (a flop an output each)."""
    assert isinstance(ctx.module, UpsampleAdd) and ctx.out_shape is not None
    return OpCost("resample", other_flops=2 * math.prod(ctx.out_shape))
