"""Graph pass: a block's 3-d core conv runs on channels-last data, converted for free by its factors.

mkldnn runs a narrow 3x3x3 conv faster on channels_last_3d data (one thread, 64^3: 8 -> 8 17.1 ->
12.7 ms on one machine, 47.7 -> 13.0 ms on an AMD EPYC; 16 -> 16 48.0 -> 24.3 ms), but converting a
map costs as much as it saves. Inside a Tucker block nothing needs converting: the first factor's
product can write positions x channels and the last factor's can read it, writing the usual layout.
Whole blocks (first, core, last), one thread: 32 -> 8 -> 8 -> 32 at 64^3 42.6 -> 26.2 ms, 64 -> 16 ->
16 -> 64 at 32^3 6.4 -> 5.2 ms and on 16 x 56 x 56 11.4 -> 8.8 ms; but at 16^3 0.37 -> 0.45 ms.

How the first factor writes positions x channels is the machine's business: the same ``mm`` with its
operands transposed was fast on the machine above, while MKL on an AMD EPYC took 50.7 ms for 32 -> 8
channels at 64^3 that way against 5.3 ms for the usual product (9.3 ms with a transposed copy after
it). On that machine the whole-model effect of the transposed product flipped sign (MONAI ResNet-10
136.8 -> 171.4 ms). So by default (``measure=True``) each block is timed in the :data:`VARIANTS`: as it
is, with the transposed product, and with the usual product copied into channels-last memory
(:func:`~tucker_fx.kernels.pointwise.channels_last_copy`, a node after the first factor), on random
data of its inputs' shapes; the fastest is kept if it beats the block as it is by :data:`MIN_GAIN`.
Timings are cached per process by shapes and thread count. With ``measure=False`` the static rule
applies (the transposed product, ranks >= :data:`MIN_RANK`).

Applies to ``first -> core -> last`` where ``first`` is a stride-1
:class:`~tucker_fx.kernels.pointwise.PointwiseConv` (its product on several parts, or a
:class:`~tucker_fx.kernels.pointwise.MixParts`: by the copy only) read only by the core, the core a
3-d conv (``nn.Conv3d`` or :class:`~tucker_fx.kernels.pointwise.MkldnnConv`; a plain conv becomes the
latter, which keeps the channels-last layout) read only by ``last``, a stride-1 ``PointwiseConv`` or
:class:`~tucker_fx.kernels.norm_fold.NormedPointwise`; batch 1, at least :data:`MIN_POSITIONS`
positions, both core ranks at least :data:`MIN_MEASURED_RANK` (:data:`MIN_RANK` without
measuring). Each module must be called at one place. Exact up to rounding (the same products,
summed in another order); eager on the CPU only (under ``torch.compile``/``torch.export`` the
kernels keep their usual layout and the copy is none).

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis.shapes import propagate_shapes
    >>> from tucker_fx.kernels.pointwise import PointwiseConv
    >>> from tucker_fx.passes.channels_last_cores import ChannelsLastCores
    >>> net = nn.Sequential(nn.Conv3d(16, 8, 1), nn.Conv3d(8, 8, 3, padding=1), nn.Conv3d(8, 16, 1)).eval()
    >>> gm = torch.fx.symbolic_trace(net)
    >>> for name in ("0", "2"):
    ...     setattr(gm, name, PointwiseConv.from_conv(net.get_submodule(name)))
    >>> x = torch.randn(1, 16, 32, 32, 32)
    >>> _ = propagate_shapes(gm, (x,))
    >>> ChannelsLastCores(measure=False)(gm).modified, gm.get_submodule("0").layout, type(gm.get_submodule("1")).__name__
    (True, 'to_channels_last', 'MkldnnConv')
    >>> with torch.no_grad():
    ...     bool(torch.allclose(gm(x), net(x), atol=1e-4)), gm(x).is_contiguous()
    (True, True)
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx._internal.timing import compare_samples
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, OpCost
from tucker_fx.kernels.norm_fold import NormedPointwise
from tucker_fx.kernels.pointwise import MixParts, MkldnnConv, PointwiseConv, channels_last_copy, mkldnn_eligible
from tucker_fx.kernels.workspace import SLOT_ATTR, WORKSPACE_ATTR, Workspace
from tucker_fx.passes.runner import PassResult
from tucker_fx.tuning.cache import device_key

__all__ = ["ChannelsLastCores", "MIN_POSITIONS", "MIN_RANK", "MIN_MEASURED_RANK", "MIN_GAIN", "VARIANTS", "MAX_SPREAD"]

MIN_POSITIONS = 32 ** 3
"""Fewer positions: the transposed products cost more than the core saves (16^3: 0.37 -> 0.45 ms)."""
MIN_RANK = 8
"""Without measuring, narrower cores are left alone (16 -> 4 -> 4 -> 16 at 64^3: 10.6 -> 10.8 ms on one
machine)."""
MIN_MEASURED_RANK = 4
"""Measured, 4-channel cores are tried too (4 -> 4 at 64^3: 14.0 -> 11.7 ms on channels-last data on an
AMD EPYC)."""
MIN_GAIN = 0.1
"""A channels-last block must be this much faster (as a fraction) than the block as it is: less is noise."""
MAX_SPREAD = 1.5
"""Runs of one variant further apart than this (upper over lower quartile) are measured again, up to twice, and
the medians taken over all runs: on a machine where another process holds a core, three runs decided
a DynUNet block (16 -> 8 at 64^3: 48 ms as it is, 26 ms channels-last) the wrong way in one build."""
VARIANTS = ("keep", "to_channels_last", "copy")
"""The block as it is; the first factor's product writing positions x channels (a single-input
``PointwiseConv`` only); the first factor's usual result copied into channels-last memory
(:func:`~tucker_fx.kernels.pointwise.channels_last_copy`; any first factor)."""

Timer = Callable[[dict[str, Callable[[], Any]]], dict[str, float]]
"""Callables by name -> median ms of each (run interleaved)."""

_MEASURED: dict[tuple, tuple[str, dict[str, float]]] = {}


def _spread(v: list[float]) -> float:
    """Upper quartile over lower quartile of the runs (1 for fewer than two)."""
    if len(v) < 2:
        return 1.0
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q3 / q1 if q1 > 0 else float("inf")


def _measure(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms of each variant, interleaved; measured again while any variant's runs spread more
    than :data:`MAX_SPREAD` (at most twice; the medians are of all runs)."""
    samples = compare_samples(fns, repeats=repeats)
    for _ in range(2):
        if all(_spread(v) <= MAX_SPREAD for v in samples.values()):
            break
        for k, v in compare_samples(fns, repeats=repeats).items():
            samples[k].extend(v)
    return {k: statistics.median(v) for k, v in samples.items()}


def _shape(node: object) -> Optional[tuple[int, ...]]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _module_call(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and not node.kwargs


def _variant(f: nn.Module, c: nn.Module, l: nn.Module, variant: str) -> Callable[..., torch.Tensor]:
    """The block ``l(c(f(*xs)))`` as ``variant`` builds it (shallow copies: the parameters are shared,
    the graph's modules untouched). The last factor writes into a reused buffer, as the full-width maps
    do in the model (``passes.workspace``): a fresh 32 MiB result costs more in page faults than the
    whole difference measured (a 32-8-8-32 block at 64^3: 78.7 ms timed with fresh results, 30 ms in
    the model)."""
    l2 = copy.copy(l)
    l2.__dict__[WORKSPACE_ATTR], l2.__dict__[SLOT_ATTR] = Workspace(), 0
    if variant == "keep":
        return lambda *xs: l2(c(f(*xs)))
    c2 = c if isinstance(c, MkldnnConv) else MkldnnConv(c)
    if isinstance(l2, PointwiseConv):
        l2.layout = "to_contiguous"
    if variant == "copy":
        return lambda *xs: l2(c2(channels_last_copy(f(*xs))))
    f2 = copy.copy(f)
    f2.layout = variant
    return lambda *xs: l2(c2(f2(*xs)))


@dataclass
class ChannelsLastCores:
    """Channels-last core convs between their factors (see the module docstring).

    ``measure``: time each block's variants and keep the fastest (default); ``False``: the static
    rule. ``repeats``: timed runs per variant (interleaved, median). ``timer``: replaces the timing
    (callables by name -> median ms), for tests."""

    name: str = "channels_last_cores"
    measure: bool = True
    repeats: int = 3
    timer: Optional[Timer] = field(default=None, repr=False)

    def _choose(self, f: nn.Module, c: nn.Module, l: nn.Module, shapes: list[tuple[int, ...]]
                ) -> tuple[str, dict[str, float]]:
        single = isinstance(f, PointwiseConv) and len(shapes) == 1
        if not self.measure:
            return ("to_channels_last" if single else "keep"), {}
        key = (device_key("cpu"), type(f).__name__, tuple(shapes), tuple(f.weight.shape), f.bias is not None,
               tuple(c.weight.shape), tuple(c.stride), tuple(c.padding), tuple(c.dilation), c.groups,
               c.bias is not None, type(l).__name__, tuple(l.weight.shape))
        if self.timer is None and key in _MEASURED:
            return _MEASURED[key]
        xs = [torch.randn(s, dtype=f.weight.dtype) for s in shapes]
        names = [v for v in VARIANTS if single or v != "to_channels_last"]
        fns = {name: (lambda v=_variant(f, c, l, name): v(*xs)) for name in names}
        ms = self.timer(fns) if self.timer is not None else _measure(fns, self.repeats)
        best = min(names[1:], key=lambda k: ms[k])
        choice = best if ms[best] < (1 - MIN_GAIN) * ms["keep"] else "keep"
        if self.timer is None:
            _MEASURED[key] = (choice, ms)
        return choice, ms

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        sites: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sites[str(node.target)] = sites.get(str(node.target), 0) + 1
        done: list[str] = []
        kept: list[str] = []
        min_rank = MIN_MEASURED_RANK if self.measure else MIN_RANK
        for core in list(gm.graph.nodes):
            if not (_module_call(core) and len(core.args) == 1 and len(core.users) == 1):
                continue
            first, last = core.args[0], next(iter(core.users))
            if not (_module_call(first) and _module_call(last) and len(last.args) == 1
                    and list(first.users) == [core]):
                continue
            if any(sites[str(n.target)] != 1 for n in (first, core, last)):
                continue
            f, c, l = (gm.get_submodule(str(n.target)) for n in (first, core, last))
            conv3d = isinstance(c, nn.Conv3d) and mkldnn_eligible(c)
            if not (isinstance(f, (PointwiseConv, MixParts))
                    and (conv3d or (isinstance(c, MkldnnConv) and c.weight.dim() == 5))
                    and isinstance(l, (PointwiseConv, NormedPointwise))):
                continue
            if isinstance(f, PointwiseConv) and (any(s != 1 for s in f.stride) or f.layout != "keep"):
                continue
            if isinstance(l, PointwiseConv) and (any(s != 1 for s in l.stride) or l.layout != "keep"):
                continue
            shape, in_shapes = _shape(core), [_shape(a) for a in first.args]
            if (shape is None or any(s is None for s in in_shapes) or shape[0] != 1
                    or math.prod(shape[2:]) < MIN_POSITIONS):
                continue
            if min(c.weight.shape[0], c.weight.shape[1]) < min_rank:
                continue
            if f.weight.device.type != "cpu" or not f.weight.dtype.is_floating_point:
                continue
            with torch.no_grad():
                variant, ms = self._choose(f, c, l, in_shapes)  # type: ignore[arg-type]
            timing = (f" ({ms['keep']:.1f} -> {ms[variant]:.1f} ms)" if variant != "keep"
                      else f" ({ms['keep']:.1f} ms, at best {min(v for k, v in ms.items() if k != 'keep'):.1f})"
                      ) if ms else ""
            if variant == "keep":
                kept.append(str(core.target) + timing)
                continue
            if variant == "copy":
                with gm.graph.inserting_after(first):
                    moved = gm.graph.call_function(channels_last_copy, (first,))
                moved.meta = {k: v for k, v in first.meta.items() if k == "tensor_meta"}
                core.replace_input_with(first, moved)
            else:
                f.layout = variant
            if isinstance(l, PointwiseConv):
                l.layout = "to_contiguous"  # NormedPointwise reads a channels-last input as it is
            if conv3d:
                parent, _, leaf = str(core.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, MkldnnConv(c))
            done.append(str(core.target) + timing + (", by a copy" if variant == "copy" else ""))
        notes = gm.meta.setdefault(NOTES_KEY, []) if (done or kept) else []
        if done:
            gm.recompile()
            notes.append("core convs on channels-last data between their factors: " + "; ".join(done))
        if kept:
            notes.append("core convs kept in their layout (channels-last measured no faster): " + "; ".join(kept))
        return PassResult(gm, bool(done))


@REGISTRY.register(channels_last_copy)
def _channels_last_copy_cost(ctx: CostContext) -> OpCost:
    """A copy into another memory layout: no arithmetic (the analysis must not list it as unsupported)."""
    return OpCost("free")
