"""Merge linear maps that meet with nothing nonlinear between them, when that lowers MACs.

Patterns (``A`` a pointwise conv (kernel 1, stride 1, no padding, groups 1) or a Linear,
``B`` the next such map, ``A``'s output used only on the way to ``B``):

- ``A -> [Identity | eval-mode dropout]* -> B`` with both pointwise convs or both Linears:
  ``W = W_B W_A``, ``b = W_B b_A + b_B``. A dropout of any kind (``nn.Dropout``,
  ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``, ``F.dropout*``) is
  transparent only in eval mode; in training mode it draws a random mask between the two
  maps, so they are not merged (the notes say so) -- compressing in train mode to fine-tune
  keeps every dropout.
- pointwise conv ``A`` -> ``[avg pooling without padding]`` -> pointwise conv ``B``: a channel
  mix commutes with average pooling, so the merged map runs after the pooling.
- pointwise conv ``A`` -> ``flatten(1)`` -> Linear ``B`` (the Tucker "Linear as conv" chain):
  ``W[t, s, p] = sum_c W_B[t, c, p] W_A[c, s]``.
- pointwise conv ``A`` (no bias) -> any conv ``B`` (groups 1): ``A`` absorbed into ``B``'s
  input channels ("first factor into the core").

A merge happens only when it lowers MACs and does not add parameters. Inside one
``TuckerBlock`` the merged map becomes the block's ``core``; a merge across two blocks marks
both ``partial`` (their own ``forward`` no longer computes the layer alone).

Needs ``tensor_meta`` on the nodes (shape propagation) to compare costs.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis import propagate_shapes
    >>> from tucker_fx.passes.merge_linear import MergeLinear
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 64), nn.Dropout(), nn.Linear(64, 4)).eval())
    >>> propagate_shapes(gm, (torch.randn(2, 8),))
    >>> MergeLinear()(gm).modified
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.decomposition.algebra import absorb_into_conv, as_matrix, compose_linear, fold_into_flat_linear
from tucker_fx.passes.runner import PassResult

__all__ = ["MergeLinear", "is_pointwise_conv"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DROPOUT_MODULES = (nn.modules.dropout._DropoutNd,)  # Dropout, Dropout1d/2d/3d, (Feature)AlphaDropout
# functional dropouts: (callable, position of the training flag, its default)
_DROPOUT_FUNCTIONS: dict[object, tuple[int, Optional[bool]]] = {
    **{f: (2, True) for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                              F.feature_alpha_dropout)},
    **{f: (2, None) for f in (torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                              torch.feature_alpha_dropout, torch.ops.aten.dropout.default)},
}
_AVGPOOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveAvgPool3d)


def is_pointwise_conv(m: nn.Module) -> bool:
    """A conv that is a per-position channel mix."""
    return (
        isinstance(m, _CONVS) and all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride)
        and not isinstance(m.padding, str) and all(p == 0 for p in m.padding) and m.groups == 1
    ) or (isinstance(m, _CONVS) and m.padding == "valid" and all(k == 1 for k in m.kernel_size)
          and all(s == 1 for s in m.stride) and m.groups == 1)


def _dropout_mode(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """``"eval"`` / ``"train"`` for a dropout node (module or functional), else ``None``.

    A functional dropout whose training flag is not a constant counts as ``"train"``."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, _DROPOUT_MODULES):
            return "train" if m.training else "eval"
        return None
    if node.op != "call_function" or node.target not in _DROPOUT_FUNCTIONS:
        return None
    pos, default = _DROPOUT_FUNCTIONS[node.target]
    flag = node.args[pos] if len(node.args) > pos else node.kwargs.get("training", node.kwargs.get("train", default))
    return "eval" if flag is False else "train"


def _transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An identity map: ``nn.Identity`` or a dropout in eval mode."""
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Identity):
        return True
    return _dropout_mode(gm, node) == "eval"


def _numel(node: fx.Node) -> int:
    tm = node.meta.get("tensor_meta")
    return math.prod(tm.shape) if tm is not None else 0


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _matrix(m: nn.Module) -> torch.Tensor:
    return as_matrix(m.weight)


def _macs(gm: fx.GraphModule, node: fx.Node) -> int:
    m = _module(gm, node)
    assert m is not None
    per_out = math.prod(m.weight.shape[1:])
    return _numel(node) * per_out


def _called_once(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A module called from several nodes (a shared layer) must not be changed in place."""
    if node.op != "call_module":
        return True
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) == 1


def _params(*mods: nn.Module) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


def _place(gm: fx.GraphModule, a: fx.Node, b: fx.Node, merged: nn.Module) -> str:
    """Where the merged module lives: inside the block when both maps belong to one
    TuckerBlock (as its core), else beside ``b``; blocks that lose a child are marked partial."""
    from tucker_fx.passes.blocks import TuckerBlock

    pa, _, ca = str(a.target).rpartition(".")
    pb, _, cb = str(b.target).rpartition(".")
    owner_a = gm.get_submodule(pa) if pa else gm
    owner_b = gm.get_submodule(pb) if pb else gm
    if pa == pb and isinstance(owner_b, TuckerBlock):
        for child in (ca, cb):
            if hasattr(owner_b, child):
                delattr(owner_b, child)
        owner_b.core = merged
        return f"{pb}.core"
    for owner in (owner_a, owner_b):
        if isinstance(owner, TuckerBlock):
            owner.partial = True
    name = str(b.target).replace(".", "_") + "_merged"
    gm.add_submodule(name, merged)
    return name


@dataclass
class MergeLinear:
    """Graph pass. Mutates modules of ``gm``; records each merge in ``gm.meta["tucker_fx.notes"]``."""

    name: str = "merge_linear"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        changed = True
        while changed:  # merging can expose new pairs
            changed = False
            for node in list(gm.graph.nodes):
                if self._try(gm, node):
                    changed = modified = True
                    break
        if modified:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
        return PassResult(gm, modified)

    def _walk(self, gm: fx.GraphModule, a: fx.Node) -> tuple[list[fx.Node], Optional[fx.Node]]:
        """The single-user chain of transparent nodes after ``a`` and the node it reaches."""
        chain: list[fx.Node] = []
        cur = a
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if _transparent(gm, nxt):
                chain.append(nxt)
                cur = nxt
                continue
            return chain, nxt
        return chain, None

    def _try(self, gm: fx.GraphModule, a: fx.Node) -> bool:
        if not _called_once(gm, a):
            return False
        ma = _module(gm, a)
        if ma is None or not (is_pointwise_conv(ma) or isinstance(ma, nn.Linear)) or ma.weight.dim() < 2:
            return False
        chain, b = self._walk(gm, a)
        if b is not None and _dropout_mode(gm, b) == "train":
            self._note_training_dropout(gm, a, ma, b)
            return False
        if b is None or (b.op == "call_module" and not _called_once(gm, b)):
            return False
        mb = _module(gm, b)
        if isinstance(ma, nn.Linear) and isinstance(mb, nn.Linear):
            return self._merge_pair(gm, a, b, chain, ma, mb, pool=None)
        if not is_pointwise_conv(ma):
            return False
        if is_pointwise_conv(mb) and type(mb) is type(ma):
            return self._merge_pair(gm, a, b, chain, ma, mb, pool=None)
        if isinstance(mb, _AVGPOOLS) and getattr(mb, "padding", 0) in (0, (0,), (0, 0), (0, 0, 0)) and len(b.users) == 1:
            after = next(iter(b.users))
            mc = _module(gm, after)
            if mc is not None and is_pointwise_conv(mc) and type(mc) is type(ma) and not chain and _called_once(gm, after):
                return self._merge_pair(gm, a, after, [], ma, mc, pool=b)
        if b.op == "call_function" and b.target is torch.flatten and len(b.users) == 1 and not chain:
            lin = next(iter(b.users))
            ml = _module(gm, lin)
            if isinstance(ml, nn.Linear) and tuple(b.args[1:]) in ((1,), ()) and b.kwargs == {} and _called_once(gm, lin):
                return self._merge_flatten(gm, a, b, lin, ma, ml)
        if isinstance(mb, _CONVS) and type(mb) is type(ma) and mb.groups == 1 and ma.bias is None and not chain:
            return self._absorb_into_conv(gm, a, b, ma, mb)
        return False

    def _note(self, gm: fx.GraphModule, text: str) -> None:
        notes = gm.meta.setdefault(NOTES_KEY, [])
        if text not in notes:  # the pass rescans the graph after every merge
            notes.append(text)

    def _note_training_dropout(self, gm: fx.GraphModule, a: fx.Node, ma: nn.Module, drop: fx.Node) -> None:
        """Say why ``a`` is not merged when a training-mode dropout separates it from a map it could join."""
        cur = drop
        while len(cur.users) == 1:
            cur = next(iter(cur.users))
            if _transparent(gm, cur) or _dropout_mode(gm, cur) is not None:
                continue
            mb = _module(gm, cur)
            if mb is not None and ((isinstance(ma, nn.Linear) and isinstance(mb, nn.Linear))
                                   or (isinstance(mb, _CONVS) and type(mb) is type(ma))):
                what = drop.target if drop.op == "call_module" else drop.format_node()
                head = f"not merged across the training-mode dropout {what}"
                if not any(n.startswith(head + ":") for n in gm.meta.get(NOTES_KEY, [])):  # once per dropout
                    self._note(gm, f"{head}: {a.target} -> {cur.target} stay separate (a random mask is not a "
                                   "linear map); put the model in eval mode to merge them")
            return

    def _merge_pair(self, gm, a, b, chain, ma, mb, pool) -> bool:
        before = _macs(gm, a) + _macs(gm, b)
        wa, wb = _matrix(ma), _matrix(mb)
        out_positions = _numel(b) // wb.shape[0]
        after = out_positions * wb.shape[0] * wa.shape[1]
        if after >= before or wb.shape[0] * wa.shape[1] > _params(ma, mb):
            return False
        with torch.no_grad():
            w, bias = compose_linear(wa, ma.bias, wb, mb.bias)
        merged = type(ma)(wa.shape[1], wb.shape[0], **({"kernel_size": 1} if not isinstance(ma, nn.Linear) else {}),
                          bias=bias is not None).to(ma.weight)
        with torch.no_grad():
            merged.weight.copy_(w.reshape(merged.weight.shape))
            if bias is not None:
                merged.bias.copy_(bias)
        graph = gm.graph
        name = _place(gm, a, b, merged)
        with graph.inserting_before(b):
            src = a.args[0]
            if pool is not None:  # pool first, then the merged mix
                src = graph.call_module(str(pool.target), (src,))
            new = graph.call_module(name, (src,))
            new.meta["tensor_meta"] = b.meta.get("tensor_meta")
        b.replace_all_uses_with(new)
        for n in [b] + ([pool] if pool is not None else []) + list(reversed(chain)) + [a]:
            if not n.users:
                graph.erase_node(n)
        self._note(gm, f"merged {a.target} into {b.target} ({before:,} -> {after:,} MACs)")
        return True

    def _merge_flatten(self, gm, a, flat, lin, ma, ml) -> bool:
        wa = _matrix(ma)  # (C, S)
        c, s = wa.shape
        t = ml.weight.shape[0]
        positions = ml.weight.shape[1] // c
        before = _macs(gm, a) + _macs(gm, lin)
        after = (_numel(lin) // t) * t * s * positions
        if after >= before or t * s * positions > _params(ma, ml):
            return False
        with torch.no_grad():
            w, bias = fold_into_flat_linear(ml.weight, ml.bias, wa, ma.bias)
        merged = nn.Linear(s * positions, t, bias=bias is not None).to(ml.weight)
        with torch.no_grad():
            merged.weight.copy_(w)
            if bias is not None:
                merged.bias.copy_(bias)
        graph = gm.graph
        name = _place(gm, a, lin, merged)
        with graph.inserting_before(lin):
            f = graph.call_function(torch.flatten, (a.args[0], 1))
            new = graph.call_module(name, (f,))
            new.meta["tensor_meta"] = lin.meta.get("tensor_meta")
        lin.replace_all_uses_with(new)
        for n in (lin, flat, a):
            graph.erase_node(n)
        self._note(gm, f"merged {a.target} into {lin.target} ({before:,} -> {after:,} MACs)")
        return True

    def _absorb_into_conv(self, gm, a, b, ma, mb) -> bool:
        wa = _matrix(ma)  # (R, S)
        before = _macs(gm, a) + _macs(gm, b)
        after = _numel(b) * wa.shape[1] * math.prod(mb.kernel_size)
        if after >= before or mb.out_channels * wa.shape[1] * math.prod(mb.kernel_size) > _params(ma, mb):
            return False
        with torch.no_grad():
            w = absorb_into_conv(mb.weight, wa)
        merged = type(mb)(wa.shape[1], mb.out_channels, mb.kernel_size, stride=mb.stride, padding=mb.padding,
                          dilation=mb.dilation, bias=mb.bias is not None, padding_mode=mb.padding_mode).to(mb.weight)
        with torch.no_grad():
            merged.weight.copy_(w)
            if mb.bias is not None:
                merged.bias.copy_(mb.bias)
        name = _place(gm, a, b, merged)
        with gm.graph.inserting_before(b):
            new = gm.graph.call_module(name, (a.args[0],))
            new.meta["tensor_meta"] = b.meta.get("tensor_meta")
        b.replace_all_uses_with(new)
        gm.graph.erase_node(b)
        gm.graph.erase_node(a)
        self._note(gm, f"absorbed {a.target} into {b.target} ({before:,} -> {after:,} MACs)")
        return True
