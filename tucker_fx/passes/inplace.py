"""Graph pass: InstanceNorms and adds write into a buffer that only they read.

Every CPU allocation of 32 MB or more pays page faults on each call (see :mod:`tucker_fx.kernels.inplace`);
in a U-Net at 64^3 the full-width norms and residual adds, which a decomposition does not touch, are
such allocations. This pass runs an InstanceNorm (without running statistics) in place, and an add
into one of its operands, where that operand is a buffer the graph owns (GroupNorm stays out of
place: ATen's in-place path for it measured slower):

- it was made by a node that returns a new tensor (a conv, a linear, a norm, an add, a cat, one of the
  package's kernels, an out-of-place activation), or by an in-place activation of such a buffer, and
- that node's only user is the norm or the add (nothing else reads it, it is not an output).

Measured in the node profile of the compressed MONAI DynUNet (one thread): the six InstanceNorms of
1 x 32 x 64^3 took 18-29 ms each. Exact: the same kernels, writing elsewhere. The in-place modules fall
back to the out-of-place ops under autograd recording, ``torch.compile`` and ``torch.export``.

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.passes.inplace import WriteInPlace
    >>> net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4), nn.ReLU()).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> x = torch.randn(1, 2, 5, 5, 5)
    >>> ref = gm(x)
    >>> WriteInPlace()(gm).modified, type(gm.get_submodule("1")).__name__
    (True, 'InplaceInstanceNorm')
    >>> bool(torch.allclose(gm(x), ref, atol=1e-5))
    True
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.kernels.conv_transpose import PatchConvTranspose
from tucker_fx.kernels.fft_conv import FFTConv, TuckerFFTConv
from tucker_fx.kernels.inplace import InplaceInstanceNorm, add_into, inplace_norm_eligible
from tucker_fx.kernels.max_pool import ChannelsLastMaxPool, SeparableMaxPool
from tucker_fx.kernels.norm_fold import NormedPointwise
from tucker_fx.kernels.pointwise import MixParts, MkldnnConv, PointwiseConv
from tucker_fx.kernels.window_max import WindowMax
from tucker_fx.passes.runner import PassResult

__all__ = ["WriteInPlace", "returns_new_buffer", "writes_into_input", "owns_buffer", "only_reader"]

_NEW_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
                nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                nn.GroupNorm, nn.LayerNorm, MkldnnConv, PointwiseConv, PatchConvTranspose, InplaceInstanceNorm,
                NormedPointwise, MixParts)
"""Modules whose output is a new buffer (the in-place norms: given a buffer only they read)."""
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                nn.Mish, nn.PReLU, nn.GELU, nn.Sigmoid, nn.Tanh)
_NEW_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, torch.cat, torch.concat, add_into,
                  F.conv1d, F.conv2d, F.conv3d, F.linear, F.instance_norm, F.group_norm, F.batch_norm,
                  torch.ops.aten.convolution.default, torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor,
                  torch.ops.aten.cat.default}
_OTHER_NEW_MODULES = (ChannelsLastMaxPool, SeparableMaxPool, FFTConv, TuckerFFTConv, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                      nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Upsample)
"""Modules that return a new tensor, but whose output a norm or an add should not be written into
(not measured), for :func:`returns_new_buffer` only."""
_COMPOSITES_THAT_COMPUTE = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                            "group_norm", "instance_norm", "layer_norm", "batch_norm", "linear",
                            "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
                            "upsample_bilinear2d", "upsample_trilinear3d", "max_pool1d", "max_pool2d", "max_pool3d"}
_INPLACE_ACT_FUNCTIONS = {F.relu, F.leaky_relu, F.elu, F.hardtanh, F.relu6, F.silu, F.hardswish, F.mish}
_ADDS = {operator.add, torch.add, torch.ops.aten.add.Tensor}


def owns_buffer(gm: fx.GraphModule, node: object, depth: int = 0) -> bool:
    """``node``'s value is a buffer that nothing outside the graph holds and no other value aliases."""
    if not isinstance(node, fx.Node) or depth > 8:
        return False
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _NEW_MODULES):
            return True
        if isinstance(module, _ACTIVATIONS):
            if not getattr(module, "inplace", False):
                return True
            src = node.args[0] if node.args else None
            return isinstance(src, fx.Node) and len(src.users) == 1 and owns_buffer(gm, src, depth + 1)
        return False
    if node.op == "call_function":
        if node.target in _NEW_FUNCTIONS:
            return True
        if node.target in _INPLACE_ACT_FUNCTIONS:
            if not node.kwargs.get("inplace", False):
                return True
            src = node.args[0] if node.args else None
            return isinstance(src, fx.Node) and len(src.users) == 1 and owns_buffer(gm, src, depth + 1)
    return False


def _aten_aliases(target: object) -> Optional[tuple[bool, bool]]:
    """For an ATen overload: (writes into its first argument, returns an alias of an argument); None
    for anything else. Read off the schema: ``Tensor(a!) self`` and ``-> Tensor(a)``."""
    schema = getattr(target, "_schema", None) if isinstance(target, torch._ops.OpOverload) else None
    if schema is None:
        return None
    first = schema.arguments[0].alias_info if schema.arguments else None
    returns_alias = any(r.alias_info is not None for r in schema.returns)
    return (first is not None and first.is_write, returns_alias)


def writes_into_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` may write into its first argument and return it (an in-place norm, activation or add):
    its value is, or may be, that argument's buffer."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return isinstance(module, InplaceInstanceNorm) or (isinstance(module, _ACTIVATIONS)
                                                           and bool(getattr(module, "inplace", False)))
    if node.op == "call_function":
        aten = _aten_aliases(node.target)
        if aten is not None:
            return aten[0] and aten[1]  # e.g. aten.leaky_relu_ of an exported graph
        return node.target is add_into or (node.target in _INPLACE_ACT_FUNCTIONS and bool(node.kwargs.get("inplace")))
    return node.op == "call_method" and str(node.target).endswith("_")


def returns_new_buffer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` returns a tensor it made, never one of its arguments or a view of one (False where this
    is not known)."""
    if writes_into_input(gm, node):
        return False
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, WindowMax):
            return any(k > 1 for k in module.kernel_size)  # all ones: the input itself
        return isinstance(module, _NEW_MODULES + _ACTIVATIONS + _OTHER_NEW_MODULES)
    if node.op == "call_function":
        aten = _aten_aliases(node.target)
        if aten is not None:
            # an op with its own kernel and no alias in its schema returns a new tensor; a composite one
            # may hand back its input unannotated (aten.dropout does when not training), unless it is
            # one of those known to compute
            name = node.target.name()
            composite = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
            return (not aten[1] and len(node.target._schema.returns) == 1
                    and (not composite or name.split("::")[-1].split(".")[0] in _COMPOSITES_THAT_COMPUTE))
        return node.target in _NEW_FUNCTIONS or node.target in _INPLACE_ACT_FUNCTIONS
    return False


def only_reader(node: object, reader: fx.Node) -> bool:
    """``reader`` is the only node that reads ``node``'s value."""
    return isinstance(node, fx.Node) and list(node.users) == [reader]


@dataclass
class WriteInPlace:
    """Norms and adds into buffers only they read (see the module docstring)."""

    name: str = "write_in_place"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        done: list[str] = []
        calls: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls.setdefault(str(node.target), []).append(node)
        for target, nodes in calls.items():
            module = gm.get_submodule(target)
            if module.training or not inplace_norm_eligible(module):
                continue
            # a shared norm is replaced for all its calls: every one must read a buffer only it reads
            if not all(len(n.args) == 1 and not n.kwargs and only_reader(n.args[0], n) and owns_buffer(gm, n.args[0])
                       for n in nodes):
                continue
            new = InplaceInstanceNorm(module)
            parent, _, leaf = target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
            done.extend(n.name for n in nodes)
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
                a, b = node.args
                if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                    continue
                if only_reader(a, node) and owns_buffer(gm, a):
                    node.target = add_into
                elif only_reader(b, node) and owns_buffer(gm, b):
                    node.target, node.args = add_into, (b, a)
                else:
                    continue
                done.append(node.name)
        if done:
            gm.recompile()
            gm.meta.setdefault(NOTES_KEY, []).append("written in place (a buffer only they read): " + ", ".join(done))
        return PassResult(gm, bool(done))
