"""torch.compile(m, backend="tucker") against torch.compile(m) (inductor): compile and run time.

    python benchmarks/backend_vs_inductor.py [--models video_unet thetis] [--repeats 11]

Each variant is compiled cold (torch._dynamo.reset() first); run times are medians of
interleaved runs. THETIS uses the paper's ranks, the video UNet a quarter of each rank.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch._dynamo

from tucker_fx.config import TuckerConfig
from tucker_fx.models import get_model
from tucker_fx.reporting.bench import bench_config
from tucker_fx.reporting.timing import compare_ms


def options_of(cfg: TuckerConfig) -> dict[str, Any]:
    """Every field of ``cfg`` (``layer_filter`` and ``exclude`` included) as ``torch.compile`` options."""
    fields = {name: getattr(cfg, name) for name in TuckerConfig.field_names()}
    fields["ranks"] = dict(cfg.ranks)
    return fields


def measure(name: str, repeats: int) -> dict:
    model, shape = get_model(name)
    x = torch.randn(shape)
    cfg = bench_config(name)
    fields = options_of(cfg)
    variants = {
        "eager": lambda: model,
        "inductor": lambda: torch.compile(model),
        "tucker+eager": lambda: torch.compile(model, backend="tucker", options={**fields, "inner": "eager"}),
        "tucker+inductor": lambda: torch.compile(model, backend="tucker", options={**fields, "inner": "inductor"}),
    }
    built, compile_s = {}, {}
    for key, make in variants.items():
        torch._dynamo.reset()
        start = time.perf_counter()
        fn = make()
        with torch.no_grad():
            fn(x)  # compiles
        compile_s[key] = time.perf_counter() - start
        built[key] = fn
    times = compare_ms({k: (lambda f=f: f(x)) for k, f in built.items()}, repeats=repeats, warmup=2)
    return {"model": name, "compile_s": compile_s, "run_ms": times}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["video_unet", "thetis"])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    print("| model | variant | first call incl. compile (s) | run median (ms) | speed-up vs eager |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        r = measure(name, args.repeats)
        base = r["run_ms"]["eager"]
        for key in r["run_ms"]:
            print(f"| {name} | {key} | {r['compile_s'][key]:.1f} | {r['run_ms'][key]:.2f} | x{base / r['run_ms'][key]:.2f} |")


if __name__ == "__main__":
    main()
