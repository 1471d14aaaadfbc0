"""Lowering: run each decomposed block (or plain conv) with the variant that is fastest here.

For every block the pass builds candidates that compute the same function, checks each against
the block's own output (``tolerance``), and keeps the fastest, chosen by measurement at the real
input shape on the real device (timings cached on disk) or, with ``tune=False``, by a cost
model. Candidates of a conv block:

- ``direct``: the three convs as they are (1x1 -> core -> 1x1);
- ``direct_channels_last``: the same with the core in channels_last(_3d) memory format;
- ``fft``: one :class:`~tucker_fx.kernels.TuckerFFTConv` (channel mix, FFT core on R_s -> R_t
  channels only, channel mix);
- ``fft_mix_last``: the same with the last mix folded into the per-frequency product;
- ``absorbed``: the first 1x1 folded into the core (a Tucker-1 shaped pair);
- ``fused`` (Linear blocks): one :class:`~tucker_fx.kernels.LinearChain` running the two or
  three small products without per-module overhead (which, for the paper's tiny L2, costs
  more than its arithmetic);
- ``original``: the layer before decomposition. If it wins, the layer is not decomposed and
  the plan says why.

Linear blocks get ``direct``, ``fused``, ``absorbed`` and ``original``; the cost model picks
``fused`` for them. The chosen variant replaces the block at its qualified name, as a single
graph node (``direct`` keeps the three nodes).
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.graph import block_name
from tucker_fx._internal.meta import LOWERING_KEY, NOTES_KEY, ORIGIN_KEY, ORIGINALS_KEY
from tucker_fx._internal.progress import Progress
from tucker_fx._internal.timing import compare_samples
from tucker_fx.analysis.cost_registry import REGISTRY, CostContext, OpCost, batched, conv_macs
from tucker_fx.decomposition.algebra import absorb_into_conv, as_matrix, compose_linear, fold_into_flat_linear
from tucker_fx.kernels import FFTConv, LinearChain, TuckerFFTConv, WindowMax, fft_size
from tucker_fx.kernels.max_pool import ChannelsLastMaxPool, SeparableMaxPool, max_pool_spec, separable_eligible
from tucker_fx.kernels.window_max import is_window_max
from tucker_fx.passes.blocks import TuckerBlock
from tucker_fx.passes.fast_kernels import fast_conv
from tucker_fx.passes.runner import PassError, PassResult
from tucker_fx.planning.plan import LayerPlan, Plan
from tucker_fx.tuning.cache import TimingCache, device_key
from tucker_fx.tuning.cost_model import direct_conv_seconds, fft_conv_seconds

__all__ = ["as_run", "LowerBlocks", "LowerConvs", "LowerMaxPools", "block_candidates", "conv_candidates", "cost_model_block_pick",
           "cost_model_conv_pick", "LOWERINGS"]

LOWERINGS = ("direct", "direct_channels_last", "fft", "fft_mix_last", "absorbed", "fused", "original")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ChannelsLast(nn.Module):
    """Runs ``conv`` with input and weight in channels_last(_3d) memory format, and returns its result in
    the input's layout: a channels-last result handed on leaks the layout into every later op (a tuned
    SegResNet whose blocks all chose this variant in isolation ran 872 ms instead of 160, its
    GroupNorms and adds on channels-last maps)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        fmt = torch.channels_last_3d if conv.weight.dim() == 5 else torch.channels_last
        self.conv = copy.deepcopy(conv).to(memory_format=fmt)
        self.fmt = fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.contiguous(memory_format=self.fmt))
        return y.contiguous() if x.is_contiguous() else y


class FlattenThen(nn.Module):
    """flatten(x, 1) then ``inner``: the original Linear of a block that starts on a feature map."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.flatten(x, 1))


def _matrix(m: nn.Module) -> torch.Tensor:
    return as_matrix(m.weight.detach())


def block_candidates(block: TuckerBlock, original: Optional[nn.Module]) -> dict[str, nn.Module]:
    """Modules that compute the same function as ``block`` (``original`` only approximately).

    Variants with more parameters than the block are dropped: lowering never undoes compression.
    """
    cands: dict[str, nn.Module] = {"direct": block}
    core, last = block.core, block.last
    first = getattr(block, "first", None)
    if isinstance(core, _CONVS):
        if core.weight.dim() >= 4:
            cl = copy.deepcopy(block)
            cl.core = ChannelsLast(core)
            cands["direct_channels_last"] = cl
        geometry = dict(stride=core.stride, padding=core.padding, dilation=core.dilation,
                        padding_mode=core.padding_mode)
        f = _matrix(first) if first is not None else None
        b = last.bias.detach() if last.bias is not None else None
        for name, mix_last in (("fft", False), ("fft_mix_last", True)):
            cands[name] = TuckerFFTConv(f, core.weight.detach(), _matrix(last), b,
                                        mix_last_in_frequency=mix_last, **geometry).to(core.weight)
        if first is not None and first.bias is None:
            merged = type(core)(f.shape[1], core.out_channels, core.kernel_size, bias=False, **geometry).to(core.weight)
            with torch.no_grad():
                merged.weight.copy_(absorb_into_conv(core.weight, f))
            cands["absorbed"] = TuckerBlock(None, merged, copy.deepcopy(last), kind="tucker1",
                                            ranks=(core.out_channels,))
    if isinstance(core, nn.Linear) and core.bias is None:
        cands["fused"] = LinearChain.from_block(block)
    if isinstance(core, nn.Linear) and first is not None and first.bias is None:
        f = _matrix(first)  # (R_s, S)
        if block.flatten:
            w, _ = fold_into_flat_linear(core.weight.detach(), None, f, None)
        else:
            w, _ = compose_linear(f, None, core.weight.detach(), None)
        merged = nn.Linear(w.shape[1], core.out_features, bias=False).to(core.weight)
        with torch.no_grad():
            merged.weight.copy_(w.reshape(merged.weight.shape))
        cands["absorbed"] = TuckerBlock(None, merged, copy.deepcopy(last), kind="svd",
                                        ranks=(core.out_features,), flatten=block.flatten)
    budget = sum(p.numel() for p in block.parameters())  # lowering must not undo the compression
    cands = {k: m for k, m in cands.items() if sum(p.numel() for p in m.parameters()) <= budget}
    if original is not None:
        cands["original"] = FlattenThen(original) if block.flatten else original
    return cands


def conv_candidates(conv: nn.Module) -> dict[str, nn.Module]:
    """Lowerings of a plain conv (no decomposition): direct, channels_last, FFT."""
    cands: dict[str, nn.Module] = {"direct": conv}
    if conv.weight.dim() >= 4:
        cands["direct_channels_last"] = ChannelsLast(conv)
    cands["fft"] = FFTConv.from_conv(conv)
    return cands


def _describe(m: nn.Module) -> str:
    shapes = [tuple(p.shape) for p in m.parameters()]
    geo = [getattr(x, attr, None) for x in m.modules() for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode")
           if hasattr(x, attr)]
    return f"{type(m).__name__}:{shapes}:{geo}:{getattr(m, 'mix_last_in_frequency', '')}"


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    denom = ref.double().norm().item()
    diff = (ref.double() - out.double()).norm().item()
    return diff / denom if denom else diff


def as_run(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """``module`` with each plain conv that will be a graph node (the module itself, or a
    :class:`TuckerBlock`'s first/core/last) swapped for the kernel that ``passes.fast_kernels`` gives
    such a conv in the graph (the same rules, at the shapes it sees on ``x``): a tuned choice must
    time what will run. Timed with ATen's own convs, the direct chain of a narrow block lost to the FFT
    variants that then ran slower in the model (MONAI ResNet-10 on an AMD EPYC: ``tune=True`` 158.1 ms,
    the default 126.7 ms, side by side). ``module`` itself where nothing changes, else a copy.

    Example:
        >>> block = TuckerBlock(nn.Conv3d(64, 16, 1), nn.Conv3d(16, 16, 3, padding=1), nn.Conv3d(16, 64, 1),
        ...                     kind="tucker2", ranks=(16, 16))
        >>> run = as_run(block, torch.randn(1, 64, 8, 8, 8))
        >>> [type(m).__name__ for m in (run.first, run.core, run.last)]
        ['PointwiseConv', 'MkldnnConv', 'PointwiseConv']
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:  # returns None: the call's arguments stay as they are
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))
        return hook

    # the convs that become graph nodes, which passes.fast_kernels sees: the module itself, or a spliced
    # TuckerBlock's children (not a conv inside a wrapper such as ChannelsLast, which stays as it is)
    nodes = {"": module} if isinstance(module, _CONVS) else (
        {k: getattr(module, k) for k in ("first", "core", "last") if isinstance(getattr(module, k, None), _CONVS)}
        if isinstance(module, TuckerBlock) else {})
    hooks = [m.register_forward_pre_hook(record(name)) for name, m in nodes.items()]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    swaps: dict[str, nn.Module] = {}
    for name, shape in shapes.items():
        found = fast_conv(module.get_submodule(name), shape, x.device, x.dtype)
        if found is not None:
            swaps[name] = found[0]
    if "" in swaps:
        return swaps[""]
    if not swaps:
        return module
    out = copy.deepcopy(module)
    for name, new in swaps.items():
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, new)
    return out


@dataclass
class _Chooser:
    """Times candidates (with the cache) or ranks them by the cost model."""

    tune: bool
    cache: Optional[TimingCache]
    repeats: int = 7
    tolerance: float = 1e-5

    def choose(self, cands: dict[str, nn.Module], x: torch.Tensor, exact: str = "direct",
               allowed_inexact: tuple[str, ...] = ("original",)) -> tuple[str, dict[str, float], str, dict[str, float]]:
        """(winner, timings ms, source, errors) among candidates within tolerance of ``exact``."""
        with torch.no_grad():
            ref = cands[exact](x)
            errors = {k: _rel(ref, m(x)) for k, m in cands.items() if k not in allowed_inexact}
        ok = {k: m for k, m in cands.items() if k in allowed_inexact or errors.get(k, 0.0) <= self.tolerance}
        if not self.tune:
            return "", {}, "cost model", errors
        keys = {k: {"device": device_key(x.device), "dtype": str(x.dtype), "shape": list(x.shape),
                    "candidate": k, "module": _describe(m)} for k, m in ok.items()}
        cached = {k: self.cache.get(key) for k, key in keys.items()} if self.cache is not None else {}
        if cached and all(v is not None for v in cached.values()):
            times, source = {k: float(v) for k, v in cached.items()}, "cache"  # type: ignore[arg-type]
        else:
            fns = {k: (lambda m=m: m(x)) for k, m in ok.items()}
            samples = compare_samples(fns, repeats=self.repeats)
            if not all(_steady(v) for v in samples.values()):  # another process took the core: measure again
                samples = compare_samples(fns, repeats=self.repeats)
            times = {k: statistics.median(v) for k, v in samples.items()}
            steady = all(_steady(v) for v in samples.values())
            source = "measured" if steady else BUSY_SOURCE
            if self.cache is not None and steady:
                for k, ms in times.items():  # timings taken on a busy machine are not kept
                    self.cache.put(keys[k], ms)
        return min(times, key=times.__getitem__), times, source, errors


BUSY_SOURCE = "measured on a busy machine (runs spread by over x1.5 twice)"
"""The ``lowering_source`` of a choice timed while another process took the CPU: such timings
never put an original layer back."""


def _steady(samples: list[float]) -> bool:
    """No wild spread between the runs (another process grabbing a core shows up as one)."""
    if len(samples) < 3:
        return True
    q = statistics.quantiles(samples, n=4)
    return q[2] <= 1.5 * q[0]


def _example(node: fx.Node, device: torch.device) -> torch.Tensor:
    tm = node.meta["tensor_meta"]
    gen = torch.Generator().manual_seed(0)
    return torch.randn(tuple(tm.shape), generator=gen, dtype=tm.dtype).to(device)


def cost_model_conv_pick(conv: nn.Module, x_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[str, dict[str, float]]:
    """The lowering of a plain conv (``direct`` or ``fft``) that the cost model predicts fastest at these
    shapes, and its estimates in ms.

    Example:
        >>> import torch.nn as nn
        >>> cost_model_conv_pick(nn.Conv3d(4, 6, (5, 11, 11), padding=(2, 5, 5)), (1, 4, 28, 80, 128), (1, 6, 28, 80, 128))[0]
        'fft'
    """
    d = conv.weight.dim() - 2
    out, x_b = batched(tuple(out_shape), d), batched(tuple(x_shape), d)
    macs = out[0] * math.prod(out[2:]) * math.prod(conv.weight.shape)
    times = {"direct": 1e3 * direct_conv_seconds(macs=macs, c_in=conv.in_channels, c_out=conv.out_channels)}
    try:
        shape = fft_size(list(x_b[2:]), conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    except ValueError:
        return "direct", times
    times["fft"] = 1e3 * fft_conv_seconds(batch=x_b[0], c_in=conv.in_channels, c_out=conv.out_channels,
                                          fft_shape=tuple(shape))
    return min(times, key=times.__getitem__), times


def cost_model_block_pick(block: TuckerBlock, x_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[str, dict[str, float]]:
    """The variant of ``block`` that the cost model predicts fastest at these shapes (what
    :class:`LowerBlocks` picks without ``tune``), and its estimates in ms."""
    core = block.core
    if isinstance(core, nn.Linear):
        return "fused", {}  # same products, less dispatch (measured faster than the module chain)
    if not isinstance(core, _CONVS):
        return "direct", {}
    r_s, r_t = core.in_channels, core.out_channels
    d = core.weight.dim() - 2
    x_shape, out_shape = batched(x_shape, d), batched(out_shape, d)  # torch's convs also take (C, *spatial)
    spatial_in = list(x_shape[2:])
    macs = out_shape[0] * math.prod(out_shape[2:]) * math.prod(core.weight.shape)
    direct = direct_conv_seconds(macs=macs, c_in=r_s, c_out=r_t)
    try:
        shape = fft_size(spatial_in, core.kernel_size, core.stride, core.padding, core.dilation, core.padding_mode)
    except ValueError:
        return "direct", {"direct": direct * 1e3}
    fft = fft_conv_seconds(batch=x_shape[0], c_in=r_s, c_out=r_t, fft_shape=tuple(shape))
    est = {"direct": direct * 1e3, "fft": fft * 1e3}
    return min(est, key=est.__getitem__), est


def _replace_chain(gm: fx.GraphModule, name: str, module: nn.Module, entry: LayerPlan) -> None:
    """Swap the block's nodes (``name.first``/``core``/``last`` and a flatten) for ``module``.

    A :class:`TuckerBlock` or :class:`FlattenThen` is spliced in as ordinary nodes (so the
    analysis and later passes see plain convs/linears); any other module becomes one node.
    """
    graph = gm.graph
    chain = [n for n in graph.nodes if n.op == "call_module" and str(n.target).rpartition(".")[0] == name
             and str(n.target).rpartition(".")[2] in ("first", "core", "last")]
    if not chain:
        raise ValueError(f"no graph nodes of block {name!r}")
    first, last = chain[0], chain[-1]
    flatten = isinstance(module, FlattenThen)
    inner = module.inner if isinstance(module, FlattenThen) else module
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, inner)
    with graph.inserting_before(first):
        x = first.args[0]
        if flatten or (isinstance(inner, TuckerBlock) and inner.flatten):
            x = graph.call_function(torch.flatten, (x, 1))
        if isinstance(inner, TuckerBlock):
            for child in ("first", "core", "last"):
                if hasattr(inner, child):
                    x = graph.call_module(f"{name}.{child}", (x,))
                    x.meta[ORIGIN_KEY] = entry.node
        else:
            x = graph.call_module(name, (x,))
            x.meta[ORIGIN_KEY] = entry.node
    x.meta["tensor_meta"] = last.meta.get("tensor_meta")
    last.replace_all_uses_with(x)
    for n in reversed(list(graph.nodes)):
        if n in chain or (n.op == "call_function" and n.target is torch.flatten and not n.users
                          and n.args and n.args[0] in chain):
            graph.erase_node(n)


@dataclass
class LowerBlocks:
    """Graph pass over a compressed graph with ``tensor_meta``; records choices in the plan.

    ``originals`` (the layer each block replaced, the ``original`` candidate) defaults to what the
    rewrite left in ``gm.meta[ORIGINALS_KEY]``. A block whose input has no ``tensor_meta`` is an
    error: run the pass through the pipeline runner, which propagates shapes first."""

    plan: Plan
    originals: Optional[dict[str, nn.Module]] = None
    tune: bool = True
    cache: Optional[TimingCache] = None
    repeats: int = 7
    tolerance: float = 1e-5
    progress: Optional[Progress] = None
    revert_margin_ms: float = 0.05
    revert_margin_rel: float = 0.1
    allow_original: bool = True
    name: str = "lower_blocks"
    """The original layer comes back only if it beats every variant by more than this and by 10%."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        chooser = _Chooser(self.tune, self.cache, self.repeats, self.tolerance)
        originals = self.originals if self.originals is not None else gm.meta.get(ORIGINALS_KEY, {})
        applied = self.plan.applied
        modified = False
        for i, entry in enumerate(applied):
            name = block_name(entry)
            if not any(n.op == "call_module" and (str(n.target) == name or str(n.target).startswith(name + "."))
                       for n in gm.graph.nodes):  # removed as dead code (the rewrite normally marks these)
                note = "not lowered: its block is no longer in the graph (dead code, output unused)"
                if note not in entry.notes:
                    entry.notes.append(note)
                continue
            block = gm.get_submodule(name)
            if not isinstance(block, TuckerBlock):
                continue
            chain = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).rpartition(".")[0] == name]
            if not chain:
                continue
            if "tensor_meta" not in chain[0].args[0].meta:
                raise PassError(f"graph pass {self.name!r}: block {name!r} (layer {entry.name!r}) has no input shape: "
                                f"no tensor_meta on {chain[0].args[0].format_node()}; expected shapes propagated "
                                "before lowering (tucker_fx.passes.pipeline runs the passes in order and does that)")
            if sum(1 for n in chain if str(n.target).endswith(".core")) > 1:
                entry.notes.append("shared module: runs as the direct chain (not lowered)")
                continue
            if self.progress is not None:
                self.progress.step(i + 1, len(applied), f"lowering {entry.name}")
            x = _example(chain[0].args[0], next(block.parameters()).device)
            cands = block_candidates(block, originals.get(entry.name) if self.allow_original else None)
            forced = entry.lowering if entry.lowering in cands else None
            if forced is not None:
                winner, times, source = forced, entry.timings_ms, "plan"
            elif self.tune:
                winner, times, source, _ = chooser.choose({k: as_run(m, x) for k, m in cands.items()}, x)
                if winner == "original":
                    best = min((k for k in times if k != "original"), key=times.__getitem__)
                    gain = times[best] - times["original"]
                    if (gain <= self.revert_margin_ms or gain <= self.revert_margin_rel * times["original"]
                            or source == BUSY_SOURCE):
                        winner = best  # noise next to the size gained, or timings a busy machine cannot back
            else:
                out_shape = tuple(chain[-1].meta["tensor_meta"].shape)
                winner, times = cost_model_block_pick(block, tuple(x.shape), out_shape)
                winner = winner if winner in cands else "direct"
                source = "cost model"
            entry.lowering, entry.timings_ms, entry.lowering_source = winner, dict(times), source
            if winner == "original":
                others = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
                entry.kind = "none"
                entry.reason = f"no decomposed variant beat the original layer on {x.device.type}: {others}"
                entry.macs_after, entry.params_after = entry.macs_before, entry.params_before
                _replace_chain(gm, name, cands["original"], entry)
                modified = True
            elif winner != "direct":
                _replace_chain(gm, name, cands[winner], entry)
                modified = True
        if self.cache is not None:
            self.cache.save()
        if modified:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
        return PassResult(gm, modified)


@dataclass
class LowerConvs:
    """Graph pass for an undecomposed model: each plain conv gets its fastest lowering.

    This is the fair baseline: the original model through the same lowering as the compressed one.
    The choices go to ``gm.meta[LOWERING_KEY]`` (``choices`` is the same mapping).
    """

    tune: bool = True
    cache: Optional[TimingCache] = None
    repeats: int = 7
    tolerance: float = 1e-5
    choices: dict[str, Any] = field(default_factory=dict)
    kept_only: bool = False
    """Only the convs a compression left alone (nodes that are not parts of a Tucker block)."""
    name: str = "lower_convs"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        chooser = _Chooser(self.tune, self.cache, self.repeats, self.tolerance)
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            conv = gm.get_submodule(str(node.target))
            if not isinstance(conv, _CONVS) or conv.groups != 1 or "tensor_meta" not in node.args[0].meta:
                continue
            if self.kept_only and ORIGIN_KEY in node.meta:
                continue  # a part of a Tucker block: lower_blocks lowers the block as a whole
            x = _example(node.args[0], conv.weight.device)
            cands = conv_candidates(conv)
            if self.tune:
                winner, times, source, _ = chooser.choose({k: as_run(m, x) for k, m in cands.items()}, x,
                                                          allowed_inexact=())
            else:
                winner, times = cost_model_conv_pick(conv, tuple(x.shape), tuple(node.meta["tensor_meta"].shape))
                source = "cost model"
            self.choices[str(node.target)] = {"lowering": winner, "timings_ms": times, "source": source}
            if winner != "direct":
                parent, _, leaf = str(node.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, cands[winner])
                modified = True
        if self.cache is not None:
            self.cache.save()
        gm.meta[LOWERING_KEY] = self.choices
        lowered = [f"{k} -> {v['lowering']} ({v['source']})" for k, v in self.choices.items() if v["lowering"] != "direct"]
        if self.kept_only and lowered:
            gm.meta.setdefault(NOTES_KEY, []).append("convs left as they are, lowered as tucker_fx.lower would: "
                                                     + ", ".join(lowered))
        return PassResult(gm, modified)


SEPARABLE_MIN_NUMEL = 1 << 18
"""Inputs of fewer elements keep :class:`~tucker_fx.kernels.max_pool.ChannelsLastMaxPool` by rule:
at 8 x 9 x 10 x 11 the three passes of :class:`~tucker_fx.kernels.max_pool.SeparableMaxPool` measured
0.08 ms against 0.04 (one thread); from 64 x 16 x 56 x 56 up they won x2-5."""


@dataclass
class LowerMaxPools:
    """Graph pass: max pools run where ATen's CPU kernel is fast. Exact.

    A pool whose windows tile its input runs as :class:`~tucker_fx.kernels.WindowMax` (reshape +
    ``amax`` per dim; measured 6.3 -> 3.7 ms on the THETIS net's first pool, 39 -> 7 ms on a
    32 x 64^3 2x2x2 pool); any other 3-d max pool without dilation or ``ceil_mode`` and of at least
    :data:`SEPARABLE_MIN_NUMEL` input elements as three 1-d maxima
    (:class:`~tucker_fx.kernels.max_pool.SeparableMaxPool`; MONAI ResNet-10's stem pool 145 ms as
    is, 78 ms channels-last, 37 ms separable), the rest on channels_last_3d data
    (:class:`~tucker_fx.kernels.max_pool.ChannelsLastMaxPool`). Modules (``nn.MaxPool3d``) and calls (``F.max_pool3d``, ``aten.max_pool3d`` of an
    exported graph) alike. Chosen by measurement with ``tune``, else by these rules (3-d pools
    only: ``max_pool3d`` computes argmax indices it never returns). The choices go to
    ``gm.meta["tucker_fx.notes"]``."""

    tune: bool = True
    cache: Optional[TimingCache] = None
    repeats: int = 7
    name: str = "lower_max_pools"

    def _candidates(self, gm: fx.GraphModule, node: fx.Node) -> Optional[dict[str, nn.Module]]:
        spec = max_pool_spec(node, gm)
        if spec is not None:
            direct = (gm.get_submodule(str(node.target)) if node.op == "call_module"
                      else ChannelsLastMaxPool.from_spec(spec))
            if spec.tiles:
                return {"direct": direct, "window_max": WindowMax(spec.kernel_size, 3)}
            cands = {"direct": direct}
            x0 = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
            large = x0 is not None and math.prod(x0.shape) >= SEPARABLE_MIN_NUMEL
            if separable_eligible(spec) and large:  # small maps: three passes' call overhead loses
                cands["separable"] = SeparableMaxPool.from_spec(spec)
            cands["channels_last"] = ChannelsLastMaxPool.from_spec(spec)
            return cands
        if node.op == "call_module":
            pool = gm.get_submodule(str(node.target))
            if is_window_max(pool):
                return {"direct": pool, "window_max": WindowMax.from_pool(pool)}
        return None

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        chooser = _Chooser(self.tune, self.cache, self.repeats, tolerance=0.0)
        modified = False
        for node in list(gm.graph.nodes):
            if node.op not in ("call_module", "call_function"):
                continue
            if not isinstance(node.args[0] if node.args else None, fx.Node) or "tensor_meta" not in node.args[0].meta:
                continue
            cands = self._candidates(gm, node)
            if cands is None:
                continue
            fast_name = next(k for k in cands if k != "direct")  # the rule's pick: the first listed
            x0 = node.args[0].meta["tensor_meta"]
            if self.tune:
                first = next(gm.parameters(), None)
                x = _example(node.args[0], first.device if first is not None else torch.device("cpu"))
                if node.op == "call_function":  # time the op itself, not our wrapper of it
                    cands["direct"] = _CallOp(node)
                winner, times, source, _ = chooser.choose(cands, x, allowed_inexact=())
                how = f"measured: {', '.join(f'{k} {v:.3g} ms' for k, v in times.items())}"
            else:
                winner = fast_name if len(x0.shape) == 5 else "direct"
                how = "cost model"
            if winner == "direct":
                continue
            label = str(node.target) if node.op == "call_module" else node.name
            if node.op == "call_module":
                parent, _, leaf = str(node.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, cands[winner])
            else:
                target = f"{node.name}_pool"
                gm.add_submodule(target, cands[winner])
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_module(target, (node.args[0],))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            gm.meta.setdefault(NOTES_KEY, []).append(f"{label} runs as {type(cands[winner]).__name__} ({how})")
            modified = True
        if modified:
            gm.recompile()
        if self.cache is not None:
            self.cache.save()
        return PassResult(gm, modified)


class _CallOp(nn.Module):
    """A call_function pool node as a module (for timing it against its replacements)."""

    def __init__(self, node: fx.Node) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = node.target, node.args[1:], dict(node.kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)


# --- runtime kernels of the lowering pass: counted as the direct computation they replace --------

@REGISTRY.register(ChannelsLastMaxPool)
def _channels_last_max_pool(ctx: CostContext) -> OpCost:
    assert isinstance(ctx.module, ChannelsLastMaxPool)
    return OpCost("pool", other_flops=ctx.out_numel * math.prod(ctx.module.spec.kernel_size))


@REGISTRY.register(SeparableMaxPool)
def _separable_max_pool(ctx: CostContext) -> OpCost:
    assert isinstance(ctx.module, SeparableMaxPool)
    return OpCost("pool", other_flops=ctx.out_numel * math.prod(ctx.module.spec.kernel_size))


@REGISTRY.register(WindowMax)
def _window_max(ctx: CostContext) -> OpCost:
    assert isinstance(ctx.module, WindowMax)
    return OpCost("pool", other_flops=ctx.out_numel * math.prod(ctx.module.kernel_size))


@REGISTRY.register(FFTConv)
def _fft_conv(ctx: CostContext) -> OpCost:
    assert ctx.module is not None and ctx.out_shape is not None
    return OpCost("conv_fft", macs=conv_macs(ctx.out_shape, tuple(ctx.module.weight.shape)))

@REGISTRY.register(TuckerFFTConv)
def _tucker_fft(ctx: CostContext) -> OpCost:
    m = ctx.module
    assert m is not None and ctx.out_shape is not None and ctx.in_shapes[0] is not None
    in_shape, out_shape = ctx.in_shapes[0], ctx.out_shape
    r_t, r_s = m.core.shape[:2]
    d = m.core.dim() - 2
    core_out = (out_shape[0], r_t, *out_shape[2:])
    macs = conv_macs(core_out, tuple(m.core.shape))
    if m.first is not None:
        macs += conv_macs((in_shape[0], r_s, *in_shape[2:]), (r_s, in_shape[1]) + (1,) * d)
    if m.last is not None:
        macs += conv_macs(out_shape, (out_shape[1], r_t) + (1,) * d)
    return OpCost("conv_fft", macs=macs)

@REGISTRY.register(LinearChain)
def _linear_chain(ctx: CostContext) -> OpCost:
    m = ctx.module
    assert isinstance(m, LinearChain) and ctx.out_shape is not None and ctx.in_shapes[0] is not None
    in_shape, out_shape = ctx.in_shapes[0], ctx.out_shape
    rows = math.prod(out_shape[:-1])  # one row per sample (and per token, without flatten)
    return OpCost("linear", macs=rows * m.macs_per_row(tuple(in_shape)))

@REGISTRY.register(ChannelsLast)
def _channels_last(ctx: CostContext) -> OpCost:
    assert ctx.module is not None and ctx.out_shape is not None
    return OpCost("conv", macs=conv_macs(ctx.out_shape, tuple(ctx.module.conv.weight.shape)))
