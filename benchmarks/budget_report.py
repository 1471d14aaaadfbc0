"""Budgeted and data-aware compression, measured: the tables of issue 15.

    python benchmarks/budget_report.py                              # all three tables
    python benchmarks/budget_report.py --skip-speed                 # (a) and (b) only, ~1 min
    python benchmarks/budget_report.py --speed-model resnet3d18 --speed-shape 1,3,8,56,56 --json out.json

(a) The small CNN of tests/test_budgeted.py, trained here (fixed seeds, ~2 s): held-out relative logit
    error against the original and accuracy right after compression (no fine-tuning), weight-only vs
    data-aware factors (``TuckerConfig(data_aware=True)``, calibration = 4 training batches of 128) at
    the same ranks (a fraction of each conv's full ranks; the 48 -> 4 head left alone).
(b) The same CNN: uniform ranks (``rank=r``) vs the budgeted search at the uniform result's FLOPs ratio
    (``target_flops_ratio=``, calibration = 2 training batches), weight-only and data-aware.
(c) ``TuckerConfig(target_speedup=2)`` on a real 3D network with random weights (right for speed,
    meaningless for accuracy): the original, ``tucker_fx.lower`` of the original (the same lowering passes,
    no decomposition: the fair baseline) and the compressed model timed side by side after compressing
    (``compare_samples``: interleaved runs, medians and min-max), with the search's rounds and time.

Not a pytest file (benchmarks/ collects test_*.py only). Timings depend on the machine and its load:
run it on an idle one before quoting them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import tucker_fx
from tucker_fx import TuckerConfig
from tucker_fx._internal.timing import compare_samples
from tucker_fx.errors import PoorCompressionWarning
from tucker_fx.testing.zoo import randomize_norms

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, speed_check=False)


def _test_module() -> Any:
    """tests/test_budgeted.py, for its CNN, data and training loop (one definition of the task)."""
    spec = importlib.util.spec_from_file_location("_budget_cnn", ROOT / "tests" / "test_budgeted.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorCompressionWarning)
        return fn(*args, **kwargs)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


# ------------------------------------------------------------------------------------------ (a), (b)


def cnn_tables(ranks: list[float]) -> dict[str, Any]:
    tm = _test_module()
    start = time.perf_counter()
    t = tm.train_small_cnn()
    print(f"trained SmallCNN ({tm.TRAIN_STEPS} Adam steps) in {time.perf_counter() - start:.1f} s: held-out accuracy "
          f"{t.accuracy:.4f} on {len(t.y_test)} samples\n")
    calib4, calib2 = t.calibration(4), t.calibration(2)
    out: dict[str, Any] = {"accuracy": t.accuracy, "a": [], "b": []}

    rows = []
    for r in ranks:
        cfg = TuckerConfig(rank=r, exclude=("fc",), **QUIET)
        w = _quiet(tucker_fx.compress, t.model, t.example, config=cfg)
        a = _quiet(tucker_fx.compress, t.model, t.example, config=cfg.replace(data_aware=True), calibration=calib4)
        (ew, aw), (ea, aa) = t.held_out(w.module), t.held_out(a.module)
        out["a"].append(dict(rank=r, flops_ratio=w.flops_ratio, weight_only=[ew, aw], data_aware=[ea, aa],
                             ranks=[list(e.ranks) for e in w.plan.applied]))
        rows.append([f"{r:g}", " ".join(str(e.ranks) for e in w.plan.applied), f"x{w.flops_ratio:.2f}", f"{ew:.4f}",
                     f"{aw:.4f}", f"{ea:.4f}", f"{aa:.4f}", f"{(ea - ew) / ew:+.0%}"])
    print("(a) right after compression, same ranks: weight-only vs data-aware (held-out logit error vs the "
          f"original; accuracy; original accuracy {t.accuracy:.4f})")
    print(_table(["rank", "ranks (conv1 conv2 conv3)", "FLOPs", "weight-only err", "acc", "data-aware err", "acc",
                  "err change"], rows))
    print()

    rows = []
    for r in ranks:
        u = _quiet(tucker_fx.compress, t.model, t.example, config=TuckerConfig(rank=r, exclude=("fc",), **QUIET))
        eu, au = t.held_out(u.module)
        row: dict[str, Any] = dict(rank=r, uniform=[u.flops_ratio, eu, au])
        cells = [f"{r:g}", f"x{u.flops_ratio:.2f}", f"{eu:.4f}", f"{au:.4f}"]
        for aware in (False, True):
            start = time.perf_counter()
            b = _quiet(tucker_fx.compress, t.model, t.example,
                       config=TuckerConfig(target_flops_ratio=u.flops_ratio, exclude=("fc",), data_aware=aware, **QUIET),
                       calibration=calib2)
            seconds = time.perf_counter() - start
            eb, ab = t.held_out(b.module)
            row["budget_data_aware" if aware else "budget"] = [b.flops_ratio, eb, ab, seconds,
                                                                {e.name: list(e.ranks) for e in b.plan.applied}]
            cells += [f"x{b.flops_ratio:.2f}", f"{eb:.4f}", f"{ab:.4f}"]
            if not aware:
                cells.append(" ".join(f"{e.name}{e.ranks}" for e in b.plan.applied).replace(" ", "") or "-")
        out["b"].append(row)
        rows.append(cells)
    print("(b) uniform ranks vs budgeted ranks at the uniform result's FLOPs ratio (held-out logit error; accuracy)")
    print(_table(["uniform rank", "FLOPs", "err", "acc", "budget FLOPs", "err", "acc", "budget ranks",
                  "+data-aware FLOPs", "err", "acc"], rows))
    print()
    return out


# ------------------------------------------------------------------------------------------------ (c)


def _monai_resnet10() -> nn.Module:
    from monai.networks import nets
    return nets.ResNet("basic", [1, 1, 1, 1], [64, 128, 256, 512], spatial_dims=3, n_input_channels=1, num_classes=2)


def _resnet3d18() -> nn.Module:
    from tucker_fx.testing.resnet3d import resnet3d18
    return resnet3d18()


SPEED_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "monai_resnet10": (_monai_resnet10, (1, 1, 32, 32, 32)),
    "resnet3d18": (_resnet3d18, (1, 3, 8, 56, 56)),
}


def speed_table(name: str, shape: tuple[int, ...], target: float, repeats: int) -> dict[str, Any]:
    factory, default_shape = SPEED_MODELS[name]
    shape = shape or default_shape
    torch.manual_seed(0)
    model = randomize_norms(factory()).eval()
    x = torch.randn(shape)
    calibration = [x, torch.randn(shape)]
    start = time.perf_counter()
    result = _quiet(tucker_fx.compress, model, x, config=TuckerConfig(target_speedup=target, progress=False),
                    calibration=calibration)
    compress_s = time.perf_counter() - start
    lowered = tucker_fx.lower(model, x)
    samples = compare_samples({"original": lambda: model(x), "lowered original": lambda: lowered(x),
                               "compressed": lambda: result.module(x)}, repeats=repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    search = result.search
    print(f"(c) target_speedup={target:g} on {name} at input {tuple(shape)} (random weights; {torch.get_num_threads()} "
          f"thread(s)); compress took {compress_s:.1f} s, of which the search {search.seconds:.1f} s")
    rows = [[k, f"{m:.1f}", f"{min(samples[k]):.1f}-{max(samples[k]):.1f}", f"x{med['original'] / m:.2f}"]
            for k, m in med.items()]
    print(_table(["model", f"median ms ({repeats} interleaved runs)", "min-max ms", "speed-up vs original"], rows))
    print(f"FLOPs x{result.flops_ratio:.2f}, params x{result.params_ratio:.2f}; "
          f"{len(result.plan.applied)}/{len(result.plan)} layers decomposed; validation rel. error "
          f"{result.validation.rel_error if result.validation else float('nan'):.3g}")
    for line in search.lines()[1:]:
        print("  " + line)
    if result.timing:
        print(f"  compress's own speed check: x{result.timing['speedup']:.2f}")
    print()
    print(result.plan)
    print()
    return {"model": name, "input": list(shape), "target_speedup": target, "compress_s": compress_s,
            "search_s": search.seconds, "rounds": search.rounds, "ms": med,
            "spread_ms": {k: [min(v), max(v)] for k, v in samples.items()},
            "speedup": med["original"] / med["compressed"],
            "speedup_vs_lowered": med["lowered original"] / med["compressed"],
            "flops_ratio": result.flops_ratio, "params_ratio": result.params_ratio,
            "plan": [(e.name, e.kind, e.ranks, e.predicted_loss, e.budget_cost, e.measured_cost) for e in result.plan]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="0.5,0.375,0.25,0.125", help="rank fractions of tables (a) and (b)")
    p.add_argument("--skip-cnn", action="store_true", help="skip tables (a) and (b)")
    p.add_argument("--skip-speed", action="store_true", help="skip table (c)")
    p.add_argument("--speed-model", default="monai_resnet10", choices=sorted(SPEED_MODELS))
    p.add_argument("--speed-shape", default="", help="input shape of (c), e.g. 1,1,32,32,32 (default: the model's)")
    p.add_argument("--target-speedup", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=9, help="timed runs per variant in (c), interleaved")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    argv_shown = sys.argv[1:] if argv is None else argv
    print("$ " + " ".join(["python", "benchmarks/budget_report.py", *map(shlex.quote, argv_shown)]))
    print(f"torch {torch.__version__}, tucker_fx {getattr(tucker_fx, '__version__', '?')}, "
          f"{torch.get_num_threads()} thread(s)\n")
    report: dict[str, Any] = {}
    if not args.skip_cnn:
        report["cnn"] = cnn_tables([float(r) for r in args.ranks.split(",")])
    if not args.skip_speed:
        shape = tuple(int(s) for s in args.speed_shape.split(",")) if args.speed_shape else ()
        report["speed"] = speed_table(args.speed_model, shape, args.target_speedup, args.repeats)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
