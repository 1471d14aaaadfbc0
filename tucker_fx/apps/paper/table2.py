"""The paper's Table 2 for this machine: weights, FLOPs and measured time per layer,
original against Tucker, with theoretical (FLOP) and observed speed-ups side by side.

Example:
    >>> from tucker_fx.apps.paper.table2 import table2
    >>> t = table2(ranks="paper", repeats=1, input_shape=(1, 4, 28, 120, 160))
    >>> t["total"]["params_after"], t["total"]["flops_after"]
    (13598, 2635140440)
"""

from __future__ import annotations

import platform
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

import tucker_fx
from tucker_fx._internal.graph import block_name
from tucker_fx._internal.timing import compare_ms
from tucker_fx.apps.paper.model import THETIS_INPUT_SHAPE, thetis_net, thetis_paper_config
from tucker_fx.validation import capture_activations

__all__ = ["table2", "format_table2", "PAPER_NAMES"]

PAPER_NAMES = {"c1": "C1", "c2": "C2", "l1": "L1", "l2": "L2", "l3": "L3"}


def _sub_steps(block: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, its input) for each child of a TuckerBlock, in order."""
    steps, h = [], x
    with torch.no_grad():
        for name in ("first", "core", "last"):
            if not hasattr(block, name):
                continue
            if name == "core" and getattr(block, "flatten", False):
                h = torch.flatten(h, 1)
            mod = getattr(block, name)
            steps.append((name, mod, h))
            h = mod(h)
    return steps


def table2(*, ranks: str = "paper", repeats: int = 7, input_shape: tuple[int, ...] = THETIS_INPUT_SHAPE,
           seed: int = 0, tune: bool = True, say: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Compress the THETIS net (plain, and fused/lowered) and measure both; plain data out.

    ``say``: called with a line at each stage (``tucker-fx demo`` prints them on stderr).
    """
    say = say or (lambda msg: None)
    if ranks not in ("paper", "vbmf"):
        raise ValueError(f"ranks must be 'paper' or 'vbmf', got {ranks!r}")
    torch.manual_seed(seed)
    model = thetis_net(seed=seed)
    x = torch.randn(input_shape)
    config = thetis_paper_config() if ranks == "paper" else tucker_fx.TuckerConfig()
    say("1/4 compressing (the paper's plain Tucker chain) ...")
    result = tucker_fx.compress(model, x, config=config.replace(lowering="none", merge=False, progress=False))
    say("2/4 compressing again, lowered (each block's fastest variant, timed) ...")
    # the same compressed model, lowered: a layer is never put back to its original here (the table
    # compares the paper's decomposition; a noisy timing must not change its weights column)
    lowered = tucker_fx.compress(model, x, config=config.replace(tune=tune, validate=False, tuning_cache=False,
                                                                 keep_original_if_faster=False, progress=False))
    reference = tucker_fx.analysis.capture(model)
    acts = capture_activations(reference, (x,), {e.input_node for e in result.plan if e.input_node})
    rows = []
    for i, entry in enumerate(result.plan):
        say(f"3/4 timing layer {PAPER_NAMES.get(entry.name, entry.name)} ({i + 1}/{len(result.plan)}, "
            f"{repeats} runs of each variant) ...")
        original = model.get_submodule(entry.name)
        x_in = acts[entry.input_node]
        layer_in = torch.flatten(x_in, 1) if entry.as_conv else x_in
        fns = {"original": lambda m=original, a=layer_in: m(a)}
        steps = []
        low_entry = lowered.plan[entry.name]
        if low_entry.applied:
            low_mod = lowered.module.get_submodule(block_name(low_entry))
            low_in = x_in if (low_entry.lowering != "original" and entry.as_conv) else layer_in
            fns["lowered"] = lambda m=low_mod, a=low_in: m(a)
        if entry.applied:
            block = result.module.get_submodule(block_name(entry))
            steps = _sub_steps(block, x_in)
            for name, mod, inp in steps:
                fns[name] = lambda m=mod, a=inp: m(a)
        times = compare_ms(fns, repeats=repeats)
        after_ms = sum(times[s[0]] for s in steps) if steps else times["original"]
        rows.append({
            "layer": PAPER_NAMES.get(entry.name, entry.name), "name": entry.name, "kind": entry.kind,
            "ranks": list(entry.ranks) if entry.ranks else None,
            "params_before": entry.params_before, "params_after": entry.params_after,
            "flops_before": entry.flops_before, "flops_after": entry.flops_after,
            "ms_before": times["original"], "ms_after": after_ms,
            "ms_parts": {s[0]: times[s[0]] for s in steps},
            "ms_lowered": times.get("lowered", times["original"]), "lowering": low_entry.lowering,
            "params_lowered": low_entry.params_after,
        })
    say("4/4 timing the whole net, original against Tucker ...")
    whole = compare_ms({"original": lambda: model(x), "tucker": lambda: result.module(x),
                        "lowered": lambda: lowered.module(x)}, repeats=repeats)
    total = {
        "params_before": result.before.total_params, "params_after": result.after.total_params,
        "flops_before": result.before.total_flops, "flops_after": result.after.total_flops,
        "ms_before": whole["original"], "ms_after": whole["tucker"], "ms_lowered": whole["lowered"],
        "params_lowered": lowered.after.total_params, "flops_lowered": lowered.after.total_flops,
    }
    v = result.validation
    return {
        "ranks": ranks, "input_shape": list(input_shape), "repeats": repeats,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
        "rows": rows, "total": total,
        "validation": v.to_dict() if v is not None else None,
        "plan": result.plan.to_dict(),
    }


def _x(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b else "-"


def format_table2(t: dict[str, Any]) -> str:
    """Markdown: the paper's Table 2 columns plus measured times on this machine."""
    lines = [
        f"Table 2 of the paper on this machine: THETIS net, input {'x'.join(map(str, t['input_shape']))}, "
        f"ranks: {t['ranks']}, torch {t['machine']['torch']}, {t['machine']['threads']} threads, "
        f"median of {t['repeats']} runs. FLOPs = 2 x MACs, bias excluded.",
        "",
        "| layer | decomposition | weights | weights Tucker | ratio | FLOPs | FLOPs Tucker | theoretical speed-up | time ms | Tucker ms (= sub-layers) | observed speed-up | lowered ms (variant) | observed speed-up, lowered |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in t["rows"]:
        dec = f"{r['kind']} ({', '.join(map(str, r['ranks']))})" if r["ranks"] and r["kind"] != "none" else "none"
        parts = " + ".join(f"{v:.2f}" for v in r["ms_parts"].values())
        after = f"{r['ms_after']:.2f}" + (f" (= {parts})" if parts else "")
        lines.append(
            f"| {r['layer']} | {dec} | {r['params_before']:,} | {r['params_after']:,} | {_x(r['params_before'], r['params_after'])} "
            f"| {r['flops_before']:,} | {r['flops_after']:,} | {_x(r['flops_before'], r['flops_after'])} "
            f"| {r['ms_before']:.2f} | {after} | {_x(r['ms_before'], r['ms_after'])} "
            f"| {r['ms_lowered']:.2f} ({r['lowering'] or '-'}) | {_x(r['ms_before'], r['ms_lowered'])} |"
        )
    tot = t["total"]
    lines.append(
        f"| **total (whole model)** | | {tot['params_before']:,} | {tot['params_after']:,} | {_x(tot['params_before'], tot['params_after'])} "
        f"| {tot['flops_before']:,} | {tot['flops_after']:,} | {_x(tot['flops_before'], tot['flops_after'])} "
        f"| {tot['ms_before']:.2f} | {tot['ms_after']:.2f} | {_x(tot['ms_before'], tot['ms_after'])} "
        f"| {tot['ms_lowered']:.2f} | {_x(tot['ms_before'], tot['ms_lowered'])} |"
    )
    v = t.get("validation")
    if v:
        lines += ["", f"Validation against the original (random weights): rel. L2 error {v['rel_error']:.3g}, "
                      f"SQNR {v['sqnr_db']:.1f} dB. Paper: x51 weights, x6.0 theoretical, x1.40 observed (C1 x1.40, C2 x1.02).",
                  "Lowered: the same decomposition, each block run as its fastest variant measured here (fft = "
                  "FFT core between the 1x1x1 mixes, fused = one module for a decomposed Linear); weights and "
                  f"FLOPs are unchanged by lowering ({t['total']['params_lowered']:,} weights)."]
    return "\n".join(lines)
