"""Fold eval-mode BatchNorm into the conv/linear before it, so the decomposed block carries
the affine map in its last factor's bias and costs nothing extra.

Works on ``call_module`` pairs (``nn.ConvNd`` -> ``nn.BatchNormNd``, ``nn.Linear`` ->
``nn.BatchNorm1d``) where the conv's output feeds only the BatchNorm, and on the functional
spellings that ``torch.compile`` and ``torch.export`` graphs use (``F.batch_norm`` after
``torch.conv3d``; ``aten.batch_norm`` after ``aten.conv3d``) when the weights and statistics
are graph attributes used by that layer alone. A BatchNorm in training mode (or without
running statistics) is left alone, and the reason recorded in ``gm.meta["tucker_fx.notes"]``.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.passes.fold_bn import FoldBatchNorm
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> FoldBatchNorm()(gm).modified, [n.op for n in gm.graph.nodes]
    (True, ['placeholder', 'call_module', 'output'])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from tucker_fx.analysis.sites import resolve_tensor, site_of

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.passes.runner import PassResult

__all__ = ["FoldBatchNorm", "NOTES_KEY"]


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# functional batch norms: target -> positions of (running_mean, running_var, weight, bias, training, eps)
_BN_FUNCS: dict[Any, tuple[int, int, int, int, int, int]] = {
    F.batch_norm: (1, 2, 3, 4, 5, 7),
    torch.batch_norm: (3, 4, 1, 2, 5, 7),
    torch.ops.aten.batch_norm.default: (3, 4, 1, 2, 5, 7),
}
_BN_KWARGS = ("running_mean", "running_var", "weight", "bias", "training", "eps")
_BN_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
_BIAS_ARG = 2  # conv/linear in every functional and aten spelling: (input, weight, bias, ...)


def _bn_args(node: fx.Node) -> Optional[dict[str, Any]]:
    """The arguments of a functional batch norm by name, or None if ``node`` is not one."""
    if node.op != "call_function" or node.target not in _BN_FUNCS:
        return None
    out: dict[str, Any] = {}
    for name, pos in zip(_BN_KWARGS, _BN_FUNCS[node.target]):
        if pos < len(node.args):
            out[name] = node.args[pos]
        elif name in node.kwargs:
            out[name] = node.kwargs[name]
        elif name in _BN_DEFAULTS:
            out[name] = _BN_DEFAULTS[name]
        else:
            return None
    return out


def _set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor, like: Optional[torch.Tensor]) -> None:
    """Store ``value`` at the dotted ``target`` of ``gm`` as a Parameter (or a buffer, like ``like``)."""
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if leaf in getattr(owner, "_buffers", {}):
        owner._buffers[leaf] = value.detach()
        return
    if hasattr(owner, leaf):
        delattr(owner, leaf)
    grad = like.requires_grad if isinstance(like, torch.Tensor) else False
    owner.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=grad))


def _private_attr(node: Any) -> bool:
    """A graph attribute that only this node reads (so it can be overwritten), or None."""
    return node is None or (isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1)


def _fold_functional(gm: fx.GraphModule, bn_node: fx.Node, notes: list[str]) -> bool:
    """Fold a functional batch norm into the conv/linear node that feeds it alone; True if folded."""
    bn = _bn_args(bn_node)
    src = bn_node.args[0] if bn_node.args else None
    if bn is None or not isinstance(src, fx.Node) or len(src.users) != 1:
        return False
    site = site_of(src, gm)
    if site is None or site.module_name is not None or site.transposed or site.weight_node is None:
        return False
    where = f"{bn_node.name} (after {src.name})"
    if bn["training"] is not False:
        notes.append(f"{where}: not folded (BatchNorm in training mode)")
        return False
    stats = [bn[k] for k in ("running_mean", "running_var", "weight", "bias")]
    if bn["running_mean"] is None or not all(v is None or (isinstance(v, fx.Node) and v.op == "get_attr") for v in stats):
        notes.append(f"{where}: not folded (its statistics are not graph attributes)")
        return False
    if not _private_attr(site.weight_node) or not _private_attr(site.bias_node):
        notes.append(f"{where}: not folded (the layer's weight or bias is shared with other nodes)")
        return False
    if (src.kwargs.get("bias") is not None) or (len(src.args) > _BIAS_ARG and src.args[_BIAS_ARG] is not site.bias_node):
        return False  # a bias that is not a plain attribute
    mean, var = resolve_tensor(bn["running_mean"], gm), resolve_tensor(bn["running_var"], gm)
    gamma = resolve_tensor(bn["weight"], gm) if bn["weight"] is not None else torch.ones_like(mean)
    beta = resolve_tensor(bn["bias"], gm) if bn["bias"] is not None else torch.zeros_like(mean)
    weight = resolve_tensor(site.weight_node, gm)
    bias = resolve_tensor(site.bias_node, gm) if site.bias_node is not None else None
    fuse = fuse_conv_bn_weights if site.op == "conv" else fuse_linear_bn_weights
    new_w, new_b = fuse(weight, bias, mean, var, float(bn["eps"]), gamma, beta)
    _set_tensor(gm, str(site.weight_node.target), new_w, weight)
    if site.bias_node is not None:
        _set_tensor(gm, str(site.bias_node.target), new_b, bias)
    else:
        target = f"{site.weight_node.target}_folded_bias".replace(".", "_")
        _set_tensor(gm, target, new_b, weight)
        with gm.graph.inserting_before(src):
            bias_node = gm.graph.get_attr(target)
        args = list(src.args) + [None] * max(0, _BIAS_ARG + 1 - len(src.args))
        args[_BIAS_ARG] = bias_node
        src.args = tuple(args)
    bn_node.replace_all_uses_with(src)
    gm.graph.erase_node(bn_node)
    notes.append(f"{where}: folded")
    return True


@dataclass
class FoldBatchNorm:
    """Graph pass. Mutates the modules of ``gm`` (run it on a copy of the user's model)."""

    name: str = "fold_batchnorm"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        notes = gm.meta.setdefault(NOTES_KEY, [])
        modified = False
        for bn_node in list(gm.graph.nodes):
            if bn_node.op == "call_function":
                modified |= _fold_functional(gm, bn_node, notes)
                continue
            if bn_node.op != "call_module":
                continue
            bn = gm.get_submodule(str(bn_node.target))
            if not isinstance(bn, _BNS):
                continue
            src = bn_node.args[0]
            if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
                continue
            layer = gm.get_submodule(str(src.target))
            if not isinstance(layer, _CONVS + (nn.Linear,)):
                continue
            if bn.training or not bn.track_running_stats or bn.running_mean is None:
                notes.append(f"{bn_node.target}: not folded into {src.target} (BatchNorm in training mode)")
                continue
            if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == src.target) > 1:
                notes.append(f"{bn_node.target}: not folded ({src.target} is called more than once)")
                continue
            fused = copy.deepcopy(layer)
            fuse = fuse_conv_bn_weights if isinstance(layer, _CONVS) else fuse_linear_bn_weights
            fused.weight, fused.bias = fuse(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                            bn.eps, bn.weight, bn.bias)
            for p_new in (fused.weight, fused.bias):
                p_new.requires_grad_(layer.weight.requires_grad)
            parent, _, leaf = str(src.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, fused)
            bn_node.replace_all_uses_with(src)
            gm.graph.erase_node(bn_node)
            notes.append(f"{bn_node.target}: folded into {src.target}")
            modified = True
        if modified:
            for node in list(gm.graph.nodes):  # the folded statistics' attribute reads
                if node.op == "get_attr" and not node.users:
                    gm.graph.erase_node(node)
            gm.delete_all_unused_submodules()
        return PassResult(gm, modified)
