"""Budgeted and data-aware compression on three *trained* models: issue 15's accuracy tables.

    python benchmarks/trained_report.py                      # all three models, ~10 min on one core
    python benchmarks/trained_report.py --models cnn,mlp     # the small ones, ~1 min
    python benchmarks/trained_report.py --json trained.json

Models (each trained here with fixed seeds, on one thread):

- ``cnn``: the small CNN of ``tests/test_budgeted.py`` (oriented gratings, 4 classes);
- ``mlp``: the digits MLP of ``docs/mlp_example.md`` (64 -> 32 -> 32 -> 10, scikit-learn's digits);
- ``thetis``: the paper's THETIS net on the synthetic clips of ``tucker-fx train`` (see ``THETIS``).

Per model, four compressions, in this order:

1. ``uniform``: ``TuckerConfig(rank=r)``, weight-only factors;
2. ``uniform, data-aware``: the same ranks, ``data_aware=True`` (factors fitted layer by layer);
3. ``budget``: ``TuckerConfig(target_speedup=s)`` with ``s`` the speed-up of (1) measured right after it
   (interleaved medians); the search picks per-layer ranks for that speed with the least predicted loss;
4. ``budget, data-aware``: (3) with ``data_aware=True``.

Then all of them and the original are timed side by side (interleaved runs, medians) at the timing
input, their test accuracy is taken right after compression, and each is fine-tuned (the plan
re-applied with ``lowering="none"`` and the same calibration data, which rebuilds the same factors;
Adam, distilling from the original) and tested again. The classifier layer is left alone everywhere.

Not a pytest file. Accuracy figures are deterministic on one machine; timings depend on its load.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import tucker_fx
from tucker_fx import TuckerConfig
from tucker_fx._internal.timing import compare_samples
from tucker_fx.errors import PoorCompressionWarning, SlowerThanOriginalWarning, TargetNotMetWarning

ROOT = Path(__file__).resolve().parents[1]

THETIS = dict(resolution=(80, 128), frames=28, train_size=256, test_size=128, epochs=10, lr=3e-3, calibration_clips=32)
"""The THETIS task of ``tucker-fx train`` (its clips, sizes and learning-rate schedule; a fixed number of
epochs instead of its early stopping on a validation split)."""


@dataclass
class Task:
    name: str
    model: nn.Module
    train_loader: DataLoader
    accuracy: Callable[[nn.Module], float]
    timing_input: torch.Tensor
    calibration: list[torch.Tensor]
    rank: float
    exclude: tuple[str, ...]
    finetune: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    train_lowered: bool = False


def _accuracy_on(x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> Callable[[nn.Module], float]:
    def acc(module: nn.Module) -> float:
        module.eval()
        right = 0
        with torch.no_grad():
            for i in range(0, len(x), batch):
                right += int((module(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
        return right / len(x)
    return acc


def cnn_task() -> Task:
    spec = importlib.util.spec_from_file_location("_budget_cnn", ROOT / "tests" / "test_budgeted.py")
    assert spec is not None and spec.loader is not None
    tm = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tm
    spec.loader.exec_module(tm)
    t = tm.train_small_cnn()
    loader = DataLoader(TensorDataset(t.x_train, t.y_train), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    return Task("cnn", t.model, loader, _accuracy_on(t.x_test, t.y_test), t.x_test[:256], t.calibration(4), 0.25,
                ("fc",), dict(epochs=2, lr=1e-3))


def mlp_task() -> Task:
    from tucker_fx.data import digits_datasets
    from tucker_fx.training import mlp
    torch.manual_seed(0)
    train, test = digits_datasets(test_fraction=0.25, seed=0)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = mlp([64, 32, 32, 10], seed=0)
    tucker_fx.finetune(model, loader, epochs=40, lr=3e-3, optimizer="adamw", weight_decay=0.1, quiet=True)
    model.eval()
    x_train = train.tensors[0]
    x_test, y_test = test.tensors
    calibration = [x_train[i:i + 128] for i in range(0, len(x_train), 128)]
    return Task("mlp", model, loader, _accuracy_on(x_test, y_test), x_test, calibration, 0.25, ("4",),
                dict(epochs=5, lr=1e-3),
                ["the MLP's layers are tiny (32 x 64 weights): its times are call overhead, not arithmetic"])


def thetis_task() -> Task:
    from tucker_fx.apps.paper.data import SyntheticThetis, thetis_net_for
    from tucker_fx.apps.paper.train_demo import _trainable
    h, w = THETIS["resolution"]
    frames = THETIS["frames"]
    kw = dict(resolution=(h, w), frames=frames, seed=0)
    train = SyntheticThetis(THETIS["train_size"], split="train", **kw)
    test = SyntheticThetis(THETIS["test_size"], split="test", **kw)
    x_train = torch.stack([train[i][0] for i in range(len(train))])
    y_train = torch.tensor([int(train[i][1]) for i in range(len(train))])
    x_test = torch.stack([test[i][0] for i in range(len(test))])
    y_test = torch.tensor([int(test[i][1]) for i in range(len(test))])
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = thetis_net_for(frames, h, w, seed=0)
    # trained as tucker-fx train does: its lowered graph (the big convs by FFT, the same parameters)
    fast = _trainable(model, x_train[:1], True)
    tucker_fx.finetune(fast, loader, epochs=THETIS["epochs"], lr=THETIS["lr"], schedule="cosine", quiet=True, seed=0)
    if fast is not model:
        model.load_state_dict(fast.state_dict())
    model.eval()
    calibration = [x_train[i:i + 4] for i in range(0, THETIS["calibration_clips"], 4)]
    return Task("thetis", model, loader, _accuracy_on(x_test, y_test, 16), x_test[:1], calibration, 0.25, ("l3",),
                dict(epochs=2, lr=1e-3), [f"synthetic THETIS at {frames} x {h} x {w}, {THETIS['train_size']} training "
                                          f"clips, {THETIS['epochs']} epochs (cosine)"], train_lowered=True)


TASKS = {"cnn": cnn_task, "mlp": mlp_task, "thetis": thetis_task}


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorCompressionWarning)
        warnings.simplefilter("ignore", TargetNotMetWarning)
        warnings.simplefilter("ignore", SlowerThanOriginalWarning)
        return fn(*args, **kwargs)


def _speedup(model: nn.Module, other: nn.Module, x: torch.Tensor, repeats: int) -> float:
    s = compare_samples({"o": lambda: model(x), "c": lambda: other(x)}, repeats=repeats)
    return statistics.median(s["o"]) / statistics.median(s["c"])


def _finetuned_accuracy(task: Task, result: "tucker_fx.CompressionResult", aware: bool) -> float:
    cfg = TuckerConfig(lowering="none", data_aware=aware, progress=False, speed_check=False, validate=False)
    student = _quiet(tucker_fx.apply_plan, task.model, result.plan, task.timing_input, config=cfg,
                     calibration=task.calibration if aware else None).module
    if task.train_lowered:  # as tucker-fx train does: the lowered graph trains the same parameters faster
        from tucker_fx.apps.paper.train_demo import _trainable
        student = _trainable(student, task.timing_input, True)
    tucker_fx.finetune(student, task.train_loader, teacher=task.model, quiet=True, seed=0, **task.finetune)
    return task.accuracy(student)


def run_task(task: Task, repeats: int) -> dict[str, Any]:
    base = dict(exclude=task.exclude, progress=False)
    x = task.timing_input
    variants: dict[str, tuple[Any, float, bool]] = {}
    start = time.perf_counter()
    uniform = _quiet(tucker_fx.compress, task.model, x, config=TuckerConfig(rank=task.rank, **base))
    variants["uniform"] = (uniform, time.perf_counter() - start, False)
    start = time.perf_counter()
    variants["uniform, data-aware"] = (_quiet(tucker_fx.compress, task.model, x,
                                              config=TuckerConfig(rank=task.rank, data_aware=True, **base),
                                              calibration=task.calibration), time.perf_counter() - start, True)
    target = _speedup(task.model, uniform.module, x, repeats)
    notes = list(task.notes)
    if target > 1.05:
        target_cfg: dict[str, Any] = dict(target_speedup=round(target, 2))
    else:
        target_cfg = dict(target_flops_ratio=round(uniform.flops_ratio, 2))
        notes.append(f"the uniform model measured x{target:.2f}, no speed-up to aim at: the budget targets its FLOPs "
                     "cut instead")
    for label, aware in (("budget", False), ("budget, data-aware", True)):
        start = time.perf_counter()
        r = _quiet(tucker_fx.compress, task.model, x, config=TuckerConfig(data_aware=aware, **target_cfg, **base),
                   calibration=task.calibration)
        variants[label] = (r, time.perf_counter() - start, aware)
    fns = {"original": (lambda: task.model(x))}
    for label, (r, _, _) in variants.items():
        fns[label] = (lambda m: (lambda: m(x)))(r.module)
    samples = compare_samples(fns, repeats=repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    original_acc = task.accuracy(task.model)
    rows = []
    for label, (r, seconds, aware) in variants.items():
        rows.append(dict(variant=label, ranks={e.name: list(e.ranks) for e in r.plan.applied},
                         factors={e.name: e.factors for e in r.plan.applied}, flops_ratio=r.flops_ratio,
                         params_ratio=r.params_ratio, ms=med[label],
                         spread_ms=[min(samples[label]), max(samples[label])], speedup=med["original"] / med[label],
                         accuracy=task.accuracy(r.module), finetuned=_finetuned_accuracy(task, r, aware),
                         compress_s=seconds,
                         search_s=r.search.seconds if r.search is not None else None))
    return dict(model=task.name, original_accuracy=original_acc, original_ms=med["original"],
                timing_input=list(x.shape), rank=task.rank, target=target_cfg, finetune=task.finetune,
                notes=notes, rows=rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def show(report: dict[str, Any], repeats: int) -> str:
    target = ", ".join(f"{k}={v:g}" for k, v in report["target"].items())
    head = (f"{report['model']}: original test accuracy {report['original_accuracy']:.4f}, "
            f"{report['original_ms']:.3g} ms at input {tuple(report['timing_input'])}; uniform rank {report['rank']:g}; "
            f"budget {target}; fine-tuning {report['finetune']}")
    rows = []
    for r in report["rows"]:
        ranks = " ".join(f"{k}{tuple(v)}" for k, v in r["ranks"].items()).replace(", ", ",").replace(",)", ")")
        data = sum(1 for f in r["factors"].values() if f == "data")
        rows.append([r["variant"], ranks or "-", f"{data}/{len(r['factors'])}" if "data-aware" in r["variant"] else "-",
                     f"x{r['flops_ratio']:.2f}", f"x{r['params_ratio']:.2f}", f"x{r['speedup']:.2f}",
                     f"{r['accuracy']:.4f}", f"{r['finetuned']:.4f}", f"{r['compress_s']:.1f}",
                     f"{r['search_s']:.1f}" if r["search_s"] is not None else "-"])
    table = _table(["variant", "ranks", "data factors", "FLOPs", "params", f"speed-up ({repeats} runs)",
                    "acc. right after", "acc. fine-tuned", "compress s", "search s"], rows)
    return "\n".join([head, table] + [f"  note: {n}" for n in report["notes"]])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn,mlp,thetis", help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--repeats", type=int, default=9, help="timed runs per variant, interleaved")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in TASKS]
    if unknown:
        p.error(f"--models: unknown {unknown}; expected some of {sorted(TASKS)}")
    argv_shown = sys.argv[1:] if argv is None else argv
    print("$ " + " ".join(["python", "benchmarks/trained_report.py", *map(shlex.quote, argv_shown)]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n", flush=True)
    out = []
    for name in names:
        start = time.perf_counter()
        task = TASKS[name]()
        trained_s = time.perf_counter() - start
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s, test accuracy {task.accuracy(task.model):.4f}; "
              "compressing, timing, fine-tuning ...", file=sys.stderr, flush=True)
        report = run_task(task, args.repeats)
        report["train_s"] = trained_s
        report["total_s"] = time.perf_counter() - start
        print(show(report, args.repeats))
        print(f"  (trained in {trained_s:.0f} s; whole model {report['total_s']:.0f} s)\n", flush=True)
        out.append(report)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
