"""Fold eval-mode BatchNorm into the conv/linear before it, so the decomposed block carries
the affine map in its last factor's bias and costs nothing extra.

Works on ``call_module`` pairs (``nn.ConvNd`` -> ``nn.BatchNormNd``, ``nn.Linear`` ->
``nn.BatchNorm1d``) where the conv's output feeds only the BatchNorm. A BatchNorm in
training mode (or without running statistics) is left alone, and the reason recorded in
``gm.meta["tucker_fx.notes"]``.

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

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from tucker_fx.passes.runner import PassResult

__all__ = ["FoldBatchNorm", "NOTES_KEY"]

NOTES_KEY = "tucker_fx.notes"

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class FoldBatchNorm:
    """Graph pass. Mutates the modules of ``gm`` (run it on a copy of the user's model)."""

    name: str = "fold_batchnorm"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        notes = gm.meta.setdefault(NOTES_KEY, [])
        modified = False
        for bn_node in list(gm.graph.nodes):
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
            gm.delete_all_unused_submodules()
        return PassResult(gm, modified)
