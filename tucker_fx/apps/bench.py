"""Side-by-side timing of a model's variants, interleaved in one process (``tucker-fx bench``).

Variants: ``original`` (eager), ``original_lowered`` (the same lowering passes without
decomposition: the fair baseline), ``original_compiled`` (inductor), ``tucker`` (plain
decomposed graph), ``tucker_lowered`` (fused and lowered), ``tucker_compiled`` (the lowered
graph through inductor). Compiled variants are optional: a cold inductor compile takes tens of
seconds on a small CPU.

Example:
    >>> from tucker_fx.apps.bench import bench
    >>> t = bench("thetis", variants=("original", "tucker"), repeats=1, tune=False)
    >>> sorted(t["variants"])
    ['original', 'tucker']
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

import tucker_fx
from tucker_fx._internal.timing import compare_ms
from tucker_fx.apps.paper.model import thetis_paper_config
from tucker_fx.models import get_model

__all__ = ["VARIANTS", "bench", "format_bench", "build_variants", "bench_config"]

VARIANTS = ("original", "original_lowered", "original_compiled", "tucker", "tucker_lowered", "tucker_compiled")


def bench_config(model_name: str, **overrides: Any) -> tucker_fx.TuckerConfig:
    """Paper ranks for the THETIS net; a quarter of each mode's rank elsewhere (random weights
    are noise to EVBMF, which would pick rank 1 everywhere)."""
    if model_name == "thetis":
        return thetis_paper_config(progress=False, **overrides)
    return tucker_fx.TuckerConfig(rank=0.25, progress=False, **overrides)


def build_variants(model_name: str, batch: int = 1, device: str = "cpu", *,
                   variants: Sequence[str] = VARIANTS, tune: bool = True,
                   input_shape: Optional[tuple[int, ...]] = None) -> tuple[dict[str, nn.Module], torch.Tensor, dict[str, Any]]:
    """The requested variants as callables on ``device``, their input, and facts about them."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; expected some of {VARIANTS}")
    model, shape = get_model(model_name)
    shape = input_shape or shape
    if shape is None:
        raise ValueError(f"no input shape for {model_name!r}")
    model = model.to(device).eval()
    x = torch.randn((batch, *shape[1:]), device=device)
    built: dict[str, nn.Module] = {}
    facts: dict[str, Any] = {"build_s": {}}

    def timed(name: str, make: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = make()
        facts["build_s"][name] = time.perf_counter() - start
        return out

    if "original" in variants:
        built["original"] = model
    if "original_lowered" in variants:
        built["original_lowered"] = timed("original_lowered", lambda: tucker_fx.lower(
            model, x, config=tucker_fx.TuckerConfig(tune=tune, tuning_cache=False)))
    if "original_compiled" in variants:
        built["original_compiled"] = timed("original_compiled", lambda: torch.compile(model))
    if "tucker" in variants:
        plain = timed("tucker", lambda: tucker_fx.compress(
            model, x, config=bench_config(model_name, lowering="none", merge=False, validate=False)))
        built["tucker"] = plain.module
        facts["tucker"] = {"params": plain.after.total_params, "flops": plain.after.total_flops}
    if {"tucker_lowered", "tucker_compiled"} & set(variants):
        low = timed("tucker_lowered", lambda: tucker_fx.compress(
            model, x, config=bench_config(model_name, tune=tune, validate=False, tuning_cache=False)))
        facts["tucker_lowered"] = {"params": low.after.total_params, "flops": low.after.total_flops,
                                   "lowering": {e.name: e.lowering for e in low.plan if e.lowering}}
        if "tucker_lowered" in variants:
            built["tucker_lowered"] = low.module
        if "tucker_compiled" in variants:
            built["tucker_compiled"] = timed("tucker_compiled", lambda: torch.compile(low.module))
    report = tucker_fx.analyze(model, x)
    facts["original"] = {"params": report.total_params, "flops": report.total_flops}
    return built, x, facts


def bench(model_name: str = "thetis", batch: int = 1, device: str = "cpu", *, variants: Sequence[str] = VARIANTS,
          repeats: int = 11, tune: bool = True, input_shape: Optional[tuple[int, ...]] = None) -> dict[str, Any]:
    """Median ms of each variant (round-robin), and ratios against the original eager model."""
    built, x, facts = build_variants(model_name, batch, device, variants=variants, tune=tune, input_shape=input_shape)
    with torch.no_grad():
        for name, m in built.items():  # compile (and warm) outside the timed loop
            start = time.perf_counter()
            m(x)
            facts["build_s"][name] = facts["build_s"].get(name, 0.0) + time.perf_counter() - start
    times = compare_ms({k: (lambda m=m: m(x)) for k, m in built.items()}, repeats=repeats, warmup=2)
    base = times.get("original")
    return {
        "model": model_name, "batch": batch, "device": device, "repeats": repeats,
        "input_shape": list(x.shape), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "variants": {k: {"ms": v, "speedup_vs_original": (base / v) if base else None} for k, v in times.items()},
        "facts": facts,
    }


def format_bench(t: dict[str, Any]) -> str:
    lines = [
        f"{t['model']} batch {t['batch']} on {t['device']} (torch {t['torch']}, {t['threads']} threads), "
        f"input {'x'.join(map(str, t['input_shape']))}, median of {t['repeats']} interleaved runs",
        "",
        "| variant | median ms | speed-up vs original eager | vs original lowered |",
        "|---|---:|---:|---:|",
    ]
    fair = t["variants"].get("original_lowered", {}).get("ms")
    for name in VARIANTS:
        v = t["variants"].get(name)
        if v is None:
            continue
        s = f"x{v['speedup_vs_original']:.2f}" if v["speedup_vs_original"] else "-"
        f = f"x{fair / v['ms']:.2f}" if fair else "-"
        lines.append(f"| {name} | {v['ms']:.2f} | {s} | {f} |")
    facts = t["facts"]
    if "tucker_lowered" in facts:
        lines += ["", f"lowering chosen per layer: {facts['tucker_lowered']['lowering']}"]
    return "\n".join(lines)
