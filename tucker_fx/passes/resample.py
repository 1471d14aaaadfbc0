"""Graph pass: linear/bilinear/trilinear upsamples on the CPU as one matrix product per axis.

ATen's CPU ``upsample_trilinear3d`` runs a scalar loop over eight inputs per output: in the
compressed MONAI SegResNet (one thread, 1 x 1 x 64^3) its 16 x 32^3 -> 64^3 call took ~24 ms, a
quarter of the model. :class:`~tucker_fx.kernels.resample.SeparableInterpolate` computes the same
interpolation as a product per spatial axis (3.3 ms there; see its module for the table). This
pass replaces, where :func:`separable_wins` says so,

- ``nn.Upsample`` modules (``call_module``; a module called at several places gets one kernel per
  call that wins);
- ``F.interpolate`` / ``F.upsample`` calls (a ``size`` computed in the graph is passed at call);
- the exported ops ``aten.upsample_{linear1d,bilinear2d,trilinear3d}`` (``.vec``, and ``.default``
  where its arguments say the same as a ``size`` or a ``scale_factor``)

by a ``SeparableInterpolate`` submodule; the new node keeps the old node's ``meta``
(``tensor_meta``, ``val``). The graph needs ``tensor_meta`` (shape propagation): the rule reads
the input and output shapes. The choices go to the notes (``gm.meta[NOTES_KEY]``).

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis.shapes import propagate_shapes
    >>> from tucker_fx.passes.resample import UseSeparableInterpolate
    >>> net = nn.Sequential(nn.Conv3d(1, 16, 1), nn.Upsample(scale_factor=2, mode="trilinear")).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> x = torch.randn(1, 1, 16, 16, 16)
    >>> propagate_shapes(gm, (x,))
    >>> UseSeparableInterpolate()(gm).modified, type(gm.get_submodule("1")).__name__
    (True, 'SeparableInterpolate')
    >>> bool(torch.allclose(gm(x), net(x), atol=1e-5))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx._internal.graph import free_attr_name
from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, OpCost
from tucker_fx.kernels.resample import (
    LINEAR_MODES,
    SeparableInterpolate,
    axis_order,
    is_separable_interpolate,
    separable_interpolate,
)
from tucker_fx.passes.runner import PassResult

__all__ = ["UseSeparableInterpolate", "separable_wins", "estimated_ms"]

aten = torch.ops.aten

_VEC = {aten.upsample_linear1d.vec: "linear", aten.upsample_bilinear2d.vec: "bilinear",
        aten.upsample_trilinear3d.vec: "trilinear"}
_DEFAULT = {aten.upsample_linear1d.default: "linear", aten.upsample_bilinear2d.default: "bilinear",
            aten.upsample_trilinear3d.default: "trilinear"}
_FUNCS = (F.interpolate, F.upsample)
_FAST_DTYPES = (torch.float32, torch.float64)

# Cost model (see separable_wins), fitted on this project's 2-core CPU (one thread, fp32): ATen's
# time per output and per call by dims; the products' time per multiply-add, per matrix of a
# batched product, per product and per call of the kernel.
_ATEN_NS_PER_OUTPUT = {1: 0.8, 2: 1.5, 3: 5.0}
_ATEN_NS_PER_CALL = {1: 5000.0, 2: 4000.0, 3: 12000.0}
_NS_PER_MAC = 0.013
_NS_PER_BATCH = 250.0
_NS_PER_CALL = 6000.0
_NS_BASE = 5000.0
_MARGIN = 0.8  # the products must be estimated at most this fraction of ATen's time


def estimated_ms(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[float, float]:
    """Estimated (ATen, products) time in ms of a linear-mode interpolation ``in_shape -> out_shape``.

    Example:
        >>> aten_ms, products_ms = estimated_ms((1, 16, 32, 32, 32), (1, 16, 64, 64, 64))
        >>> round(aten_ms, 1), round(products_ms, 1)
        (21.0, 3.2)
    """
    dims = len(in_shape) - 2
    shape = list(in_shape)
    macs, batches, calls = 0, 0, 0
    for axis in axis_order(dims):
        a = 2 + axis
        length, out_len = shape[a], out_shape[a]
        if length == out_len:  # an identity (scale 1): the kernel skips it
            continue
        shape[a] = out_len
        macs += math.prod(shape) * length
        pre, post = math.prod(shape[:a]), math.prod(shape[a + 1:])
        batches += pre if pre > 1 and post > 1 else 0
        calls += 1
    aten_ns = math.prod(out_shape) * _ATEN_NS_PER_OUTPUT[dims] + _ATEN_NS_PER_CALL[dims]
    ours_ns = macs * _NS_PER_MAC + batches * _NS_PER_BATCH + calls * _NS_PER_CALL + _NS_BASE
    return aten_ns * 1e-6, ours_ns * 1e-6


def separable_wins(in_shape: Sequence[int], out_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> bool:
    """A linear-mode interpolation that the products run faster than ATen (CPU, float32/float64).

    The products cost ``in_len`` multiply-adds per output and axis (dense matrices) plus a few
    microseconds a call and a fraction of one per matrix of a batched product; ATen a constant
    per output (~5 ns in 3-d, ~1.5 ns in 2-d, whose kernel is vectorised). :func:`estimated_ms` is
    that model, fitted to measurements on this project's 2-core CPU (one thread, fp32, batch 1,
    ``F.interpolate`` -> products); the products win when estimated at most 0.8 of ATen's time.
    Checked against 128 measured cases (scale 2 on 1 to 256 channels, 3-d axes 2 to 128 long,
    2-d 4 to 224, 1-d 4 to 1024; scale 3, 0.5, 7 -> 10 sizes, (1, 2, 2)): it chose none that
    lost, and left 15 that won (small 3-d grids, 2-d with few channels). For example:

    - 3-d: 16 x 32^3 x2: 23 -> 3.7 ms, chosen; 1 x 128^3 x2: 90 -> 73 ms, chosen; 4 x 4^3 x2:
      0.027 -> 0.031 ms, kept; 16 x 128^3 x0.5: 25 -> 92 ms, kept;
    - 2-d: 64 x 56^2 x2: 1.25 -> 0.96 ms, chosen; 16 x 128^2 x2: 1.4 -> 2.3 ms, kept; 256 x 4^2
      x2: 0.035 -> 0.10 ms, kept;
    - 1-d: 4096 rows of 16 x2: 0.13 -> 0.04 ms, chosen; 256 rows of 64: a draw, kept.

    Example:
        >>> separable_wins((1, 16, 32, 32, 32), (1, 16, 64, 64, 64)), separable_wins((1, 16, 128, 128), (1, 16, 256, 256))
        (True, False)
    """
    dims = len(in_shape) - 2
    if (torch.device(device).type != "cpu" or dtype not in _FAST_DTYPES or dims not in _ATEN_NS_PER_OUTPUT
            or len(out_shape) != len(in_shape) or math.prod(out_shape) == 0):
        return False
    aten_ms, ours_ms = estimated_ms(in_shape, out_shape)
    return ours_ms <= _MARGIN * aten_ms


def _device(gm: fx.GraphModule, node: fx.Node) -> torch.device:
    for n in (node, node.args[0] if node.args else None):
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return val.device
    for t in (*gm.parameters(), *gm.buffers()):
        return t.device
    return torch.device("cpu")


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if tm is None or not hasattr(tm, "shape"):
        return None
    try:
        return tuple(int(s) for s in tm.shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _dtype(node: fx.Node) -> Optional[torch.dtype]:
    tm = node.meta.get("tensor_meta")
    return getattr(tm, "dtype", None)


def _has_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value)


@dataclass
class _Call:
    """A linear-mode interpolation found in the graph: the module to build and the size given at call."""

    kernel: SeparableInterpolate
    size_at_call: Any = None


def _from_args(mode: str, size: Any, scale_factor: Any, align_corners: Any, recompute: Any = None,
               antialias: Any = False) -> Optional[_Call]:
    if _has_node(scale_factor) or _has_node(align_corners) or _has_node(recompute) or _has_node(antialias):
        return None
    if _has_node(size):
        if scale_factor is not None or not is_separable_interpolate(mode, recompute_scale_factor=recompute,
                                                                    antialias=bool(antialias), size_at_call=True):
            return None
        return _Call(SeparableInterpolate(None, None, mode, align_corners, recompute, bool(antialias)), size)
    if not is_separable_interpolate(mode, size=size, scale_factor=scale_factor, recompute_scale_factor=recompute,
                                    antialias=bool(antialias)):
        return None
    return _Call(SeparableInterpolate(size, scale_factor, mode, align_corners, recompute, bool(antialias)))


def _normalized(gm: fx.GraphModule, node: fx.Node) -> Optional[dict[str, Any]]:
    try:
        found = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    except Exception:  # an argument that the signature does not take
        return None
    return dict(found.kwargs) if found is not None else None


def _function_call(gm: fx.GraphModule, node: fx.Node) -> Optional[_Call]:
    kw = _normalized(gm, node)
    if kw is None:
        return None
    mode = kw.get("mode", "nearest")
    if not isinstance(mode, str) or mode not in LINEAR_MODES:
        return None
    return _from_args(mode, kw.get("size"), kw.get("scale_factor"), kw.get("align_corners"),
                      kw.get("recompute_scale_factor"), kw.get("antialias", False))


def _aten_call(gm: fx.GraphModule, node: fx.Node, in_shape: tuple[int, ...]) -> Optional[_Call]:
    mode = _VEC.get(node.target) or _DEFAULT[node.target]  # type: ignore[index]
    args = list(node.args) + [None] * 6
    if node.kwargs:
        kw = _normalized(gm, node)
        if kw is None:
            return None
        args = [kw.get(a.name) for a in node.target._schema.arguments] + [None] * 6  # type: ignore[union-attr]
    size, align_corners = args[1], args[2]
    if node.target in _VEC:
        return _from_args(mode, size, args[3], bool(align_corners) if isinstance(align_corners, bool) else
                          align_corners)
    # .default: an output size, and per axis an optional scale for the source coordinates
    dims = LINEAR_MODES[mode]
    scales = args[3:3 + dims]
    if all(s is None for s in scales):
        return _from_args(mode, size, None, align_corners)
    if _has_node(size) or any(s is None or _has_node(s) for s in scales) or size is None:
        return None
    # the same as F.interpolate(scale_factor=scales) when the sizes are the ones it would compute
    if any(int(n * float(s)) != int(o) for n, s, o in zip(in_shape[2:], scales, size)):
        return None
    return _from_args(mode, None, tuple(float(s) for s in scales), align_corners)


def _module_call(gm: fx.GraphModule, node: fx.Node) -> Optional[_Call]:
    up = gm.get_submodule(str(node.target))
    if type(up) is SeparableInterpolate or not isinstance(up, nn.Upsample) or up.mode not in LINEAR_MODES:
        return None
    if len(node.args) != 1 or node.kwargs:
        return None
    return _from_args(up.mode, up.size, up.scale_factor, up.align_corners, up.recompute_scale_factor)


@dataclass
class UseSeparableInterpolate:
    """Graph pass over a graph with ``tensor_meta``: linear-mode upsamples as products per axis
    where :func:`separable_wins` says so (see the module docstring)."""

    name: str = "separable_interpolate"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        chosen: list[str] = []
        kept: list[str] = []
        retargeted: set[str] = set()
        module_uses: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module_uses[str(node.target)] = module_uses.get(str(node.target), 0) + 1
        for node in list(gm.graph.nodes):
            if not node.args or not isinstance(node.args[0], fx.Node):
                continue
            is_module = node.op == "call_module"
            if not (is_module or (node.op == "call_function" and (
                    node.target in _FUNCS or node.target in _VEC or node.target in _DEFAULT))):
                continue
            src = node.args[0]
            in_shape, out_shape, dtype = _shape(src), _shape(node), _dtype(node)
            if in_shape is None or out_shape is None or dtype is None:
                continue
            if is_module:
                call = _module_call(gm, node)
            elif node.target in _FUNCS:
                call = _function_call(gm, node)
            else:
                call = _aten_call(gm, node, in_shape)
            if call is None or len(in_shape) != LINEAR_MODES[call.kernel.mode] + 2:
                continue
            if not separable_wins(in_shape, out_shape, dtype, _device(gm, node)):
                kept.append(str(node.target) if is_module else node.name)
                continue
            if is_module and module_uses[str(node.target)] == 1:
                parent, _, leaf = str(node.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, call.kernel)
                chosen.append(str(node.target))
                continue
            if is_module:
                retargeted.add(str(node.target))
            target = free_attr_name(gm, f"{node.name}_separable")
            gm.add_submodule(target, call.kernel)
            kwargs = {} if call.size_at_call is None else {"size": call.size_at_call}
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(target, (src,), kwargs)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            chosen.append(target)
        if chosen or kept:
            notes = gm.meta.setdefault(NOTES_KEY, [])
            if chosen:
                notes.append(f"linear upsamples as products per axis: {_shown(chosen)}")
            if kept:
                notes.append(f"linear upsamples kept on ATen (the products would not win): {_shown(kept)}")
        if chosen:
            used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
            for old in retargeted - used:  # an nn.Upsample whose every call was replaced
                gm.delete_submodule(old)
            gm.recompile()
        return PassResult(gm, bool(chosen))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


@REGISTRY.register(SeparableInterpolate, separable_interpolate)
def _separable_cost(ctx: CostContext) -> OpCost:
    return OpCost("resample", other_flops=ctx.out_numel)
