"""Build a :class:`Plan` from an analysed graph and a :class:`TuckerConfig`.

Reads the ``Site`` and ``NodeCost`` records that the analysis wrote into ``node.meta``;
chooses per layer the kind (Algorithm 1 roles or the cheapest) and ranks (EVBMF, an int,
a fraction, or an override); guards, skips and records why.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx._internal.meta import COST_KEY, get_site
from tucker_fx._internal.progress import Progress
from tucker_fx.analysis.cost_registry import batched
from tucker_fx.analysis.sites import Site
from tucker_fx.config import TuckerConfig
from tucker_fx.decomposition import evbmf, unfold, vbmf_ranks
from tucker_fx.errors import DecompositionError
from tucker_fx.planning.block_costs import (
    svd_linear_cost,
    tucker1_conv_cost,
    tucker2_conv_cost,
    tucker2_linear_as_conv_cost,
    tucker2_linear_cost,
)
from tucker_fx.planning.plan import LayerPlan, Plan

__all__ = ["build_plan", "candidate_sites", "flatten_source", "check_plan_entry", "option_kind", "option_cost"]

_aten = torch.ops.aten
# flatten spellings of traced, Dynamo and exported graphs; the shape check in flatten_source
# makes sure a reshape/view really is a flatten of (B, S, *spatial) to (B, S * prod spatial)
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape, _aten.flatten.using_ints, _aten.view.default,
                      _aten.reshape.default, _aten._unsafe_view.default}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


def _shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    tm = node.meta.get("tensor_meta")
    return tuple(int(s) for s in tm.shape) if tm is not None and hasattr(tm, "shape") else None


def flatten_source(site: Site, gm: fx.GraphModule) -> Optional[fx.Node]:
    """For a Linear fed by a flatten of a (B, S, *spatial) feature map, that feature map's node."""
    if site.op != "linear" or not site.node.args or not isinstance(site.node.args[0], fx.Node):
        return None
    flat = site.node.args[0]
    is_flatten = (
        (flat.op == "call_module" and isinstance(gm.get_submodule(str(flat.target)), nn.Flatten))
        or (flat.op == "call_function" and flat.target in _FLATTEN_FUNCTIONS)
        or (flat.op == "call_method" and flat.target in _FLATTEN_METHODS)
    )
    if not is_flatten or not flat.args or not isinstance(flat.args[0], fx.Node):
        return None
    src = flat.args[0]
    src_shape, flat_shape = _shape(src), _shape(flat)
    if src_shape is None or flat_shape is None or not 3 <= len(src_shape) <= 5 or len(flat_shape) != 2:
        return None
    if src_shape[0] != flat_shape[0] or math.prod(src_shape[1:]) != flat_shape[1]:
        return None
    return src


def candidate_sites(gm: fx.GraphModule) -> list[Site]:
    """Every conv/linear site of an analysed graph, in graph order."""
    return [site for n in gm.graph.nodes if (site := get_site(n)) is not None]


def _op_label(site: Site) -> str:
    if site.op == "linear":
        return "linear"
    return f"conv_transpose{site.spatial_dims}d" if site.transposed else f"conv{site.spatial_dims}d"


def check_plan_entry(entry: LayerPlan, site: Site) -> None:
    """Refuse a plan entry made for another layer than ``site`` (another op, another weight size).

    ``params_before`` may include a bias that BatchNorm folding added, so it must be the weight's
    size, with or without one bias per output channel; 0 (a hand-written entry) is not checked.
    """
    label = _op_label(site)
    weights = math.prod(site.weight_shape)
    here = weights + (site.out_channels if site.has_bias else 0)
    if entry.op != label:
        raise ValueError(
            f"the plan's layer {entry.name!r} is a {entry.op}, this model's is a {label} "
            f"({site.in_channels} -> {site.out_channels}): the plan was made for another model"
        )
    if entry.params_before and entry.params_before not in (weights, weights + site.out_channels):
        raise ValueError(
            f"the plan's layer {entry.name!r} has {entry.params_before:,} parameters, this model's has {here:,} "
            f"({label} {site.in_channels} -> {site.out_channels}, weight {tuple(site.weight_shape)}): "
            "the plan was made for another model"
        )


def _skip_reason(site: Site, name: str, config: TuckerConfig) -> Optional[str]:
    unreadable = site.unreadable_reason()
    if unreadable is not None:
        return unreadable
    if site.transposed:
        return "transposed convolutions are not decomposed"
    if site.groups != 1:
        return f"groups={site.groups}: grouped and depthwise convolutions are not decomposed"
    if name in config.ranks and config.ranks[name] is None:
        return "ranks override is None"
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by pattern {pattern!r}"
    if config.layer_filter is not None and not config.layer_filter(name):
        return "layer_filter returned False"
    return None


class _LayerPlanner:
    """Plans one layer; holds its weight and geometry."""

    def __init__(self, site: Site, gm: fx.GraphModule, config: TuckerConfig) -> None:
        self.site, self.config = site, config
        self.name = site.display_name
        w = site.weight(gm).detach()
        if w.is_meta:
            raise DecompositionError(
                f"layer {self.name!r} ({site.node.format_node()}) has its weights on the meta device (shapes "
                "only, no values); expected real weights: load them before compressing"
            )
        bad = (~torch.isfinite(w)).sum().item()
        if bad:
            raise DecompositionError(
                f"layer {self.name!r} ({site.node.format_node()}) has {bad} NaN/Inf weight values; "
                "expected finite weights"
            )
        self.weight = w
        self.src = flatten_source(site, gm)
        node = site.node
        self.in_shape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        self.out_shape = _shape(node)
        if site.op == "conv":  # an unbatched (C, *spatial) input counts as a batch of one
            self.in_shape = batched(self.in_shape, site.spatial_dims) if self.in_shape else None
            self.out_shape = batched(self.out_shape, site.spatial_dims) if self.out_shape else None
        self.feature_shape = _shape(self.src) if self.src is not None else None
        self.notes: list[str] = []

    # -- geometry ---------------------------------------------------------------------------
    def t2_weight(self, as_conv: bool) -> torch.Tensor:
        if as_conv:
            assert self.feature_shape is not None
            return self.weight.reshape(self.weight.shape[0], *self.feature_shape[1:])
        return self.weight

    def full_ranks(self, kind: str, as_conv: bool) -> tuple[int, int]:
        w = self.t2_weight(as_conv)
        t, s, vol = w.shape[0], w.shape[1], math.prod(w.shape[2:])
        if kind == "tucker2":
            return (min(s, t * vol), min(t, s * vol))
        if kind == "tucker1":
            return (min(s * vol, t), min(t, s * vol))
        return (min(s, t), min(s, t))  # svd

    def cost(self, kind: str, ranks: tuple[int, ...], as_conv: bool) -> tuple[int, int]:
        s = self.site
        assert self.in_shape is not None and self.out_shape is not None
        if kind == "tucker2" and s.op == "conv":
            return tucker2_conv_cost(self.in_shape, self.out_shape, s.kernel_size, (ranks[0], ranks[1]), s.has_bias)
        if kind == "tucker1":
            return tucker1_conv_cost(self.in_shape, self.out_shape, s.kernel_size, ranks[0], s.has_bias)
        if kind == "tucker2" and as_conv:
            assert self.feature_shape is not None
            return tucker2_linear_as_conv_cost(self.feature_shape, s.out_channels, (ranks[0], ranks[1]), s.has_bias)
        if kind == "tucker2":
            return tucker2_linear_cost(self.in_shape, s.out_channels, (ranks[0], ranks[1]), s.has_bias)
        return svd_linear_cost(self.in_shape, s.out_channels, ranks[0], s.has_bias)

    # -- ranks --------------------------------------------------------------------------------
    def auto_ranks(self, kind: str, as_conv: bool) -> tuple[tuple[int, ...], str]:
        rank, full = self.config.rank, self.full_ranks(kind, as_conv)
        n = 2 if kind == "tucker2" else 1
        if rank == "vbmf":
            if kind == "tucker2":
                found = vbmf_ranks(self.t2_weight(as_conv))
            elif kind == "tucker1":
                found = (evbmf(unfold(self.weight, 0)).rank,)
            else:
                found = (evbmf(self.weight).rank,)
            floor = self.config.min_rank
            out = []
            for mode, (r, f) in enumerate(zip(found, full[2 - n:] if n == 1 else full)):
                if r < floor:
                    self.notes.append(f"EVBMF gave rank {r} (mode {'R_s' if n == 2 and mode == 0 else 'R_t'}); floored to min_rank={floor}")
                out.append(min(max(r, floor), f))
            return tuple(out), "vbmf"
        if isinstance(rank, int):
            picked = [min(rank, f) for f in full]
            source = "int"
        else:
            picked = [min(f, max(1, math.ceil(rank * f))) for f in full]
            source = "fraction"
        return (tuple(picked) if n == 2 else (picked[1],)), source

    def override_ranks(self, value: object, kind: str, as_conv: bool) -> tuple[int, ...]:
        full = self.full_ranks(kind, as_conv)
        ranks = value if isinstance(value, tuple) else (value,)
        limits = full if kind == "tucker2" else (full[1],)
        if any(not 1 <= r <= f for r, f in zip(ranks, limits)):
            what = "1 <= R_s <= {} and 1 <= R_t <= {}".format(*full) if kind == "tucker2" else f"1 <= R <= {full[1]}"
            raise ValueError(
                f"TuckerConfig.ranks[{self.name!r}] = {value!r}: expected {what} for this layer "
                f"({_op_label(self.site)} {self.site.in_channels} -> {self.site.out_channels}, {kind})"
            )
        return tuple(int(r) for r in ranks)  # type: ignore[union-attr]

    # -- the decision -------------------------------------------------------------------------
    def options(self, role_first_conv: bool, role_first_linear: bool) -> list[tuple[str, bool]]:
        """(kind, as_conv) pairs to consider, per the policy or the override's arity."""
        s, override = self.site, self.config.ranks.get(self.name, "absent")
        as_conv_ok = self.src is not None
        if isinstance(override, tuple):
            return [("tucker2", as_conv_ok)]
        if isinstance(override, int):
            return [("tucker1" if s.op == "conv" else "svd", False)]
        if self.config.policy == "auto":
            if s.op == "conv":
                return [("tucker2", False), ("tucker1", False)]
            return [("svd", False)] + ([("tucker2", True)] if as_conv_ok else [])
        if s.op == "conv":
            return [("tucker1" if role_first_conv else "tucker2", False)]
        if role_first_linear and as_conv_ok:
            return [("tucker2", True)]
        return [("svd", False)]

    def plan(self, role_first_conv: bool, role_first_linear: bool) -> LayerPlan:
        s = self.site
        override = self.config.ranks.get(self.name, "absent")
        macs_before = self.site.node.meta[COST_KEY].macs
        params_before = self.weight.numel() + (s.out_channels if s.has_bias else 0)
        best: Optional[tuple[tuple[int, int], str, bool, tuple[int, ...], str]] = None
        for kind, as_conv in self.options(role_first_conv, role_first_linear):
            if override != "absent":
                ranks, source = self.override_ranks(override, kind, as_conv), "override"
            else:
                ranks, source = self.auto_ranks(kind, as_conv)
            cost = self.cost(kind, ranks, as_conv)
            if best is None or cost < best[0]:
                best = (cost, kind, as_conv, ranks, source)
        assert best is not None
        (macs_after, params_after), kind, as_conv, ranks, source = best
        entry = LayerPlan(
            name=self.name, node=s.node.name, op=_op_label(s), kind=kind, ranks=ranks,
            full_ranks=self.full_ranks(kind, as_conv), rank_source=source, as_conv=as_conv,
            functional=s.module_name is None,
            feature_shape=self.feature_shape[1:] if as_conv and self.feature_shape else None,
            input_node=(self.src.name if as_conv and self.src is not None else s.node.args[0].name),
            macs_before=macs_before, params_before=params_before, macs_after=macs_after,
            params_after=params_after, notes=self.notes,
        )
        if self.config.only_if_cheaper and not (macs_after < macs_before and params_after < params_before):
            entry.kind, entry.reason = "none", (
                f"not cheaper: {kind} at ranks {ranks} costs {macs_after:,} MACs / {params_after:,} params "
                f"vs {macs_before:,} / {params_before:,} (only_if_cheaper=True)"
            )
            entry.macs_after, entry.params_after = macs_before, params_before
        return entry


def _skipped(site: Site, gm: fx.GraphModule, reason: str) -> LayerPlan:
    params = math.prod(site.weight_shape) + (site.out_channels if site.has_bias else 0)
    macs = site.node.meta[COST_KEY].macs
    arg0 = site.node.args[0]
    return LayerPlan(
        name=site.display_name, node=site.node.name, op=_op_label(site), kind="none", ranks=None,
        full_ranks=(site.in_channels, site.out_channels), rank_source="-",
        functional=site.module_name is None,
        input_node=arg0.name if isinstance(arg0, fx.Node) else None, macs_before=macs,
        params_before=params, macs_after=macs, params_after=params, reason=reason,
    )


def build_plan(gm: fx.GraphModule, config: TuckerConfig, progress: Optional[Progress] = None) -> Plan:
    """Plan every conv/linear site of an analysed ``gm`` (see :mod:`tucker_fx.analysis`)."""
    sites = candidate_sites(gm)
    names = list(dict.fromkeys(s.display_name for s in sites))
    unknown = sorted(set(config.ranks) - set(names))
    if unknown:
        raise ValueError(
            f"TuckerConfig.ranks names layers that do not exist: {unknown}; the layers are: {names}"
        )
    first_conv = next((s for s in sites if s.op == "conv"), None)
    first_linear = next((s for s in sites if s.op == "linear"), None)
    layers = []
    seen: set[str] = set()
    for i, site in enumerate(sites):
        if site.display_name in seen:
            continue  # a shared module: its first call plans it, the rewrite reroutes every call
        seen.add(site.display_name)
        reason = _skip_reason(site, site.display_name, config)
        requested = config.ranks.get(site.display_name)
        if requested is not None and (site.transposed or site.groups != 1):
            raise ValueError(
                f"TuckerConfig.ranks[{site.display_name!r}] = {requested!r}: this layer cannot be decomposed "
                f"({reason}); expected no override or None for it"
            )
        if reason is not None:
            layers.append(_skipped(site, gm, reason))
            continue
        if progress is not None:
            progress.step(i + 1, len(sites), f"planning {site.display_name}")
        planner = _LayerPlanner(site, gm, config)
        layers.append(planner.plan(site is first_conv, site is first_linear))
    notes = [f"exclude pattern {p!r} matches no layer; the layers are: {names}"
             for p in config.exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    return Plan(layers, notes=notes)


def option_kind(entry: LayerPlan) -> Optional[str]:
    """The decomposition kind a planned layer would use (also for one left alone as not cheaper);
    ``None`` for a layer that cannot be decomposed."""
    if entry.applied:
        return entry.kind
    if entry.ranks is None:
        return None
    if len(entry.ranks) == 2:
        return "tucker2"
    return "tucker1" if entry.op.startswith("conv") else "svd"


def option_cost(gm: fx.GraphModule, entry: LayerPlan, config: TuckerConfig, ranks: tuple[int, ...]) -> tuple[int, int]:
    """``(MACs, params)`` of ``entry``'s layer decomposed as :func:`option_kind` says, at ``ranks``."""
    kind = option_kind(entry)
    if kind is None:
        raise ValueError(f"layer {entry.name!r} cannot be decomposed ({entry.reason})")
    node = next(n for n in gm.graph.nodes if n.name == entry.node)
    site = get_site(node)
    assert site is not None
    return _LayerPlanner(site, gm, config).cost(kind, ranks, entry.as_conv)
