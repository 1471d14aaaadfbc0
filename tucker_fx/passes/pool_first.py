"""Run max-pooling before a monotone activation: ``pool(act(x)) == act(pool(x))``.

For a non-decreasing elementwise ``act`` (ReLU, ReLU6, LeakyReLU with a non-negative slope,
ELU, Hardtanh, Sigmoid, Tanh), the max over a window commutes with ``act``; max-pooling pads
with -inf, so padding does not change that. An activation in place moves too where its input has
no other reader (it then writes into the pool's new output; MONAI's ResNet stem: a ReLU over
64 x 64^3 becomes one over 64 x 32^3). Pooling first applies the activation to the pooled
(smaller) tensor: on the THETIS net, ReLU then touches 1/32 of C1's output. Exact; the
``return_indices`` form is left alone.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.passes.pool_first import PoolBeforeActivation
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))
    >>> PoolBeforeActivation()(gm).modified, [n.target for n in gm.graph.nodes][1:3]
    (True, ['1', '0'])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.passes.runner import PassResult

__all__ = ["PoolBeforeActivation"]

_MONOTONE_MODULES = (nn.ReLU, nn.ReLU6, nn.ELU, nn.Hardtanh, nn.Sigmoid, nn.Tanh)
_MONOTONE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.elu, F.hardtanh, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}
_MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _inplace_of_private(node: fx.Node, inplace: bool) -> bool:
    """An activation in place may move after the pool only where nothing else reads its input (else
    that reader saw the activated values, and would see the raw ones after the move)."""
    src = node.args[0] if node.args else None
    return not inplace or (isinstance(src, fx.Node) and len(src.users) == 1)


def _is_monotone(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.LeakyReLU):
            return m.negative_slope >= 0 and _inplace_of_private(node, m.inplace)
        return isinstance(m, _MONOTONE_MODULES) and _inplace_of_private(node, bool(getattr(m, "inplace", False)))
    if node.op == "call_function" and node.target in _MONOTONE_FUNCTIONS:
        return _inplace_of_private(node, bool(node.kwargs.get("inplace", False)))
    return node.op == "call_method" and node.target in ("relu", "sigmoid", "tanh")


@dataclass
class PoolBeforeActivation:
    """Graph pass: ``act -> maxpool`` becomes ``maxpool -> act`` where the activation feeds only the pool."""

    name: str = "pool_before_activation"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for pool in list(gm.graph.nodes):
            if pool.op != "call_module" or not isinstance(gm.get_submodule(str(pool.target)), _MAXPOOLS):
                continue
            if gm.get_submodule(str(pool.target)).return_indices:
                continue
            act = pool.args[0]
            if not isinstance(act, fx.Node) or len(act.users) != 1 or not _is_monotone(gm, act):
                continue
            src = act.args[0]
            # pool <- act <- src   becomes   act' <- pool' <- src
            with gm.graph.inserting_before(act):
                new_pool = gm.graph.call_module(str(pool.target), (src,))
                new_act = gm.graph.create_node(act.op, act.target, (new_pool, *act.args[1:]), dict(act.kwargs))
            for key in ("tensor_meta",):
                if key in pool.meta:
                    new_pool.meta[key] = pool.meta[key]
                    new_act.meta[key] = pool.meta[key]
            pool.replace_all_uses_with(new_act)
            gm.graph.erase_node(pool)
            gm.graph.erase_node(act)
            gm.meta.setdefault(NOTES_KEY, []).append(f"{pool.target} now runs before {act.target}")
            modified = True
        return PassResult(gm, modified)
