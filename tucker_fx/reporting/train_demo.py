"""``tucker-fx train``: the paper's accuracy claim end to end, on the synthetic THETIS stand-in.

Train the THETIS net until its test accuracy passes the target (or ``max_epochs``), compress it
with EVBMF ranks and with the paper's Table 2 ranks, and report accuracy right after compression
and after a few epochs of fine-tuning (distilling from the original), with the weight and FLOP
ratios and the measured speed-up. The paper: 90.9% before and after, x51 fewer weights.

Example (a tiny configuration; the defaults take minutes):
    >>> from tucker_fx.reporting.train_demo import train_demo
    >>> r = train_demo(resolution=(32, 40), frames=8, train_size=8, test_size=4, max_epochs=1,
    ...                finetune_epochs=1, repeats=1, plot=None, probe=False, quiet=True)
    >>> [m["name"] for m in r["compressed"]], r["compressed"][1]["params_after"] < r["original"]["params"]
    (['evbmf', 'paper'], True)
"""

from __future__ import annotations

import math
import platform
import sys
import time
from typing import Any, Optional, TextIO

import torch
from torch.utils.data import DataLoader

import tucker_fx
from tucker_fx.config import TuckerConfig
from tucker_fx.data import CLASSES, DEFAULT_RESOLUTION, THETIS_FRAMES, SyntheticThetis, linear_probe, thetis_net_for
from tucker_fx.models import thetis_paper_config
from tucker_fx.reporting.timing import compare_ms
from tucker_fx.training import EvalResult, evaluate, finetune

__all__ = ["train_demo", "format_train_demo", "plot_train_demo", "DEFAULTS"]

#: the defaults of ``tucker-fx train`` (about 4 minutes on an idle 2-core CPU)
DEFAULTS: dict[str, Any] = dict(
    resolution=DEFAULT_RESOLUTION, frames=THETIS_FRAMES, train_size=256, test_size=128, batch_size=8,
    max_epochs=10, target=0.9, lr=3e-3, finetune_epochs=4, finetune_lr=1e-3, seed=0, repeats=5,
)

PAPER = {"accuracy": 0.909, "params_ratio": 51.2, "flops_ratio": 6.0, "observed_speedup": 1.40}


def _acc(r: EvalResult) -> dict[str, Any]:
    d = r.to_dict()
    return {"accuracy": d["accuracy"], "per_class": d["per_class"], "loss": d["loss"], "correct": d["correct"],
            "total": d["total"]}


def _say(quiet: bool, stream: Optional[TextIO], msg: str) -> None:
    if not quiet:
        print(msg, file=stream if stream is not None else sys.stderr, flush=True)


def _plan_rows(result: "tucker_fx.CompressionResult") -> list[dict[str, Any]]:
    return [{"name": e.name, "kind": e.kind, "ranks": list(e.ranks) if e.ranks else None,
             "params_before": e.params_before, "params_after": e.params_after,
             "flops_before": e.flops_before, "flops_after": e.flops_after, "full_ranks": list(e.full_ranks),
             "as_conv": e.as_conv, "weight_error": e.weight_error,
             "notes": "; ".join(n for n in (e.reason, *e.notes) if n)}
            for e in result.plan]


def train_demo(*, resolution: tuple[int, int] = DEFAULTS["resolution"], frames: int = DEFAULTS["frames"],
               train_size: int = DEFAULTS["train_size"], test_size: int = DEFAULTS["test_size"],
               batch_size: int = DEFAULTS["batch_size"], max_epochs: int = DEFAULTS["max_epochs"],
               target: float = DEFAULTS["target"], lr: float = DEFAULTS["lr"],
               finetune_epochs: int = DEFAULTS["finetune_epochs"], finetune_lr: float = DEFAULTS["finetune_lr"],
               seed: int = DEFAULTS["seed"], repeats: int = DEFAULTS["repeats"], probe: bool = True,
               train_lowered: bool = True,
               plot: Optional[str] = "train_demo.png", quiet: bool = False,
               stream: Optional[TextIO] = None) -> dict[str, Any]:
    """Run the whole workflow and return plain data (what ``--json`` writes); see the module doc.

    ``train_lowered``: train the original through ``tucker_fx.lower(model, x)`` (same parameters,
    its big first conv by FFT: faster) and copy the weights back. The compressed models are
    fine-tuned as ``TuckerConfig(lowering="none")`` graphs, then lowered for the timing."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"train_demo: target must be an accuracy in (0, 1], got {target!r}")
    for name, v in (("train_size", train_size), ("test_size", test_size), ("batch_size", batch_size),
                    ("max_epochs", max_epochs), ("finetune_epochs", finetune_epochs), ("repeats", repeats)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"train_demo: {name} must be an int >= 1, got {v!r}")
    t0 = time.perf_counter()
    h, w = resolution
    model = thetis_net_for(frames, h, w, seed=seed)  # validates the geometry first
    train = SyntheticThetis(train_size, resolution=(h, w), frames=frames, seed=seed, split="train")
    test = SyntheticThetis(test_size, resolution=(h, w), frames=frames, seed=seed, split="test")
    _say(quiet, stream, f"tucker-fx train: synthetic THETIS, {train_size} train / {test_size} test clips of "
                        f"4 x {frames} x {h} x {w}; rendering ...")
    tr = time.perf_counter()
    for ds in (train, test):
        for i in range(len(ds)):
            ds[i]
    render_s = time.perf_counter() - tr
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen)
    train_eval = DataLoader(train, batch_size=16)
    test_loader = DataLoader(test, batch_size=16)
    out: dict[str, Any] = {
        "settings": dict(resolution=[h, w], frames=frames, train_size=train_size, test_size=test_size,
                         batch_size=batch_size, max_epochs=max_epochs, target=target, lr=lr,
                         finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, seed=seed, repeats=repeats),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
        "classes": list(CLASSES), "paper": PAPER, "render_seconds": render_s,
    }
    if probe:
        tp = time.perf_counter()
        pr = linear_probe(train, test)
        out["linear_probe"] = {**pr.to_dict(), "seconds": time.perf_counter() - tp}
        _say(quiet, stream, f"  {pr}")

    # 1. train the original until it passes the target
    curve: list[dict[str, float]] = []

    def check(epoch: int, hist: Any) -> bool:
        acc = evaluate(fast, test_loader).accuracy
        curve.append({"epoch": epoch, "train_loss": hist.losses[-1], "test_accuracy": acc})
        _say(quiet, stream, f"  epoch {epoch}: train loss {hist.losses[-1]:.4f}, test accuracy {acc:.1%}")
        return acc >= target

    torch.manual_seed(seed)
    x = torch.randn(1, 4, frames, h, w, generator=torch.Generator().manual_seed(seed))
    # Train through the lowered graph: the same function and the same parameter names, with the
    # 5x11x11 conv by FFT, which makes a training step several times faster on a CPU.
    fast = tucker_fx.lower(model.eval(), x, tune=False, tuning_cache=False) if train_lowered else model
    if fast.state_dict().keys() != model.state_dict().keys():  # pragma: no cover - a lowering that renames
        fast = model
    _say(quiet, stream, f"training the THETIS net (Adam, lr {lr}) until test accuracy >= {target:.0%} "
                        f"or {max_epochs} epochs ...")
    hist = finetune(fast, train_loader, epochs=max_epochs, lr=lr, quiet=quiet, stream=stream, label="train",
                    callback=check)
    if fast is not model:
        model.load_state_dict(fast.state_dict())  # `fast` stays as the (faster) teacher: the same weights
    model.eval()
    fast.eval()
    before, before_train = evaluate(model, test_loader, class_names=CLASSES), evaluate(model, train_eval)
    report = tucker_fx.analyze(model, x)
    out["original"] = {"params": report.total_params, "flops": report.total_flops, "epochs": len(hist.losses),
                       "train_seconds": hist.seconds, "curve": curve, "test": _acc(before),
                       "train": _acc(before_train), "reached_target": before.accuracy >= target}
    _say(quiet, stream, f"original: {before}")

    # 2. compress with EVBMF and with the paper's ranks; 3. fine-tune each, distilling from the original
    configs = {"evbmf": TuckerConfig(lowering="none", progress=False),
               "paper": thetis_paper_config(lowering="none", progress=False)}
    out["compressed"] = []
    timed: dict[str, Any] = {"original": model, "original_lowered": tucker_fx.lower(model, x, tune=False,
                                                                                   tuning_cache=False)}
    for name, cfg in configs.items():
        result = tucker_fx.compress(model, x, config=cfg)
        right_after = evaluate(result.module, test_loader, class_names=CLASSES)
        right_after_train = evaluate(result.module, train_eval)
        _say(quiet, stream, f"{name} ranks: x{result.params_ratio:.1f} fewer weights; right after compression {right_after}")
        torch.manual_seed(seed)
        result.module.requires_grad_(True)  # every factor trains (compress may hand them back frozen)
        student = result.module
        if train_lowered:  # as for the original: the same parameters, the core convs by FFT where faster
            student = tucker_fx.lower(result.module, x, tune=False, tuning_cache=False).requires_grad_(True)
            if student.state_dict().keys() != result.module.state_dict().keys():  # pragma: no cover
                student = result.module
        ft = finetune(student, train_loader, epochs=finetune_epochs, lr=finetune_lr, teacher=fast,
                      quiet=quiet, stream=stream, label=f"finetune {name}")
        if student is not result.module:
            result.module.load_state_dict(student.state_dict())
        result.module.eval()
        after = evaluate(result.module, test_loader, class_names=CLASSES)
        after_train = evaluate(result.module, train_eval)
        _say(quiet, stream, f"{name} ranks after {finetune_epochs} fine-tuning epochs: {after}")
        timed[name] = result.module
        timed[f"{name}_lowered"] = tucker_fx.lower(result.module, x, tune=False, tuning_cache=False)
        out["compressed"].append({
            "name": name, "params_after": result.after.total_params, "flops_after": result.after.total_flops,
            "params_ratio": result.params_ratio, "flops_ratio": result.flops_ratio, "plan": _plan_rows(result),
            "validation_rel_error": result.validation.rel_error if result.validation is not None else None,
            "after_compression": {"test": _acc(right_after), "train": _acc(right_after_train)},
            "after_finetune": {"test": _acc(after), "train": _acc(after_train), "epochs": finetune_epochs,
                               "seconds": ft.seconds, "losses": ft.losses},
        })

    # 4. measured speed, batch 1, medians of round-robin runs
    _say(quiet, stream, f"timing batch-1 inference ({repeats} runs each) ...")
    with torch.no_grad():
        ms = compare_ms({k: (lambda m=m: m(x)) for k, m in timed.items()}, repeats=repeats)
    out["ms"] = ms
    for entry in out["compressed"]:
        n = entry["name"]
        entry["ms"], entry["ms_lowered"] = ms[n], ms[f"{n}_lowered"]
        entry["speedup"], entry["speedup_lowered"] = ms["original"] / ms[n], ms["original"] / ms[f"{n}_lowered"]
    out["seconds"] = time.perf_counter() - t0
    if plot:
        out["plot"] = plot_train_demo(out, plot)
        if out["plot"]:
            _say(quiet, stream, f"wrote {out['plot']}")
        else:
            _say(quiet, stream, "matplotlib is not installed: no plot (pip install -e \".[plot]\")")
    return out


def _pct(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _ranks(row: dict[str, Any]) -> str:
    if row["kind"] == "none" or not row["ranks"]:
        return "none"
    return f"{row['kind']} ({', '.join(map(str, row['ranks']))})"


def format_train_demo(r: dict[str, Any]) -> str:
    """Markdown: accuracy before/after compression and fine-tuning, costs, speed, and ranks."""
    s, o = r["settings"], r["original"]
    lines = [
        f"THETIS net on synthetic THETIS (4 x {s['frames']} x {s['resolution'][0]} x {s['resolution'][1]}, "
        f"{s['train_size']} train / {s['test_size']} test clips), torch {r['machine']['torch']}, "
        f"{r['machine']['threads']} threads; {r['seconds']:.0f} s in all.",
        "",
        f"Original: trained {o['epochs']} epoch(s) in {o['train_seconds']:.0f} s; test accuracy "
        f"{_pct(o['test']['accuracy'])} (forehand {_pct(o['test']['per_class'][0])}, backhand "
        f"{_pct(o['test']['per_class'][1])}), train accuracy {_pct(o['train']['accuracy'])}"
        + ("" if o["reached_target"] else f" -- target {_pct(s['target'])} NOT reached in {s['max_epochs']} epochs") + ".",
    ]
    if "linear_probe" in r:
        p = r["linear_probe"]
        lines.append(f"Linear probe (logistic regression on pixels pooled to {'x'.join(map(str, p['pool']))} per channel, "
                     f"{p['features']:,} features): train {_pct(p['train_accuracy'])}, test {_pct(p['test_accuracy'])}.")
    lines += [
        "",
        "| model | weights | weights ratio | FLOPs (2xMAC) | FLOPs ratio | ms eager | ms lowered | speed-up eager / lowered "
        "| test acc. after compression | test acc. after fine-tuning | per class (fore / back) | train acc. before -> after fine-tuning |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
        f"| original | {o['params']:,} | x1.00 | {o['flops']:,} | x1.00 | {r['ms']['original']:.1f} | "
        f"{r['ms']['original_lowered']:.1f} | x1.00 / x{r['ms']['original'] / r['ms']['original_lowered']:.2f} | "
        f"{_pct(o['test']['accuracy'])} | - | {_pct(o['test']['per_class'][0])} / {_pct(o['test']['per_class'][1])} "
        f"| {_pct(o['train']['accuracy'])} |",
    ]
    for c in r["compressed"]:
        a, f = c["after_compression"], c["after_finetune"]
        lines.append(
            f"| {c['name']} ranks | {c['params_after']:,} | x{c['params_ratio']:.1f} | {c['flops_after']:,} | "
            f"x{c['flops_ratio']:.2f} | {c['ms']:.1f} | {c['ms_lowered']:.1f} | x{c['speedup']:.2f} / "
            f"x{c['speedup_lowered']:.2f} | {_pct(a['test']['accuracy'])} | {_pct(f['test']['accuracy'])} "
            f"(+{f['epochs']} ep.) | {_pct(f['test']['per_class'][0])} / {_pct(f['test']['per_class'][1])} | "
            f"{_pct(a['train']['accuracy'])} -> {_pct(f['train']['accuracy'])} |")
    names = [row["name"] for row in r["compressed"][0]["plan"]]
    lines += ["", "Ranks per layer (Tucker-2 as (R_s, R_t)):", "",
              "| layer | " + " | ".join(f"{c['name']} ranks | {c['name']} weights" for c in r["compressed"]) + " |",
              "|---|" + "---|---:|" * len(r["compressed"])]
    for i, n in enumerate(names):
        cells = []
        for c in r["compressed"]:
            row = c["plan"][i]
            cells.append(f"{_ranks(row)} | {row['params_before']:,} -> {row['params_after']:,}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    notes = [f"{c['name']} {row['name']}: {row['notes']}" for c in r["compressed"] for row in c["plan"] if row["notes"]]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    lines += ["", f"Paper: {_pct(PAPER['accuracy'])} before and after fine-tuning, x{PAPER['params_ratio']} weights, "
                  f"x{PAPER['flops_ratio']} FLOPs, x{PAPER['observed_speedup']} observed on CPU. Speed: batch 1, median of "
                  f"{s['repeats']} runs; 'lowered' = tucker_fx.lower(...) of the fine-tuned model (cost-model choices)."]
    return "\n".join(lines)


def plot_train_demo(r: dict[str, Any], path: str) -> Optional[str]:
    """A PNG: test accuracy against weight compression (after compression, after fine-tuning), and
    the measured speed-ups next to the FLOP ratios. Returns ``path``, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = 100 * r["original"]["test"]["accuracy"]
    ax.axhspan(base - 1, base + 1, color="0.9", label="original +- 1 point")
    ax.scatter([1], [base], color="k", zorder=3, label=f"original ({base:.1f}%)")
    colors = {"evbmf": "tab:blue", "paper": "tab:orange"}
    for c in r["compressed"]:
        col = colors.get(c["name"], "tab:green")
        a = 100 * c["after_compression"]["test"]["accuracy"]
        f = 100 * c["after_finetune"]["test"]["accuracy"]
        ax.scatter([c["params_ratio"]], [a], facecolors="none", edgecolors=col, s=60, zorder=3,
                   label=f"{c['name']} ranks, right after compression")
        ax.scatter([c["params_ratio"]], [f], color=col, s=60, zorder=3,
                   label=f"{c['name']} ranks, after {c['after_finetune']['epochs']} fine-tuning epochs")
        ax.annotate("", xy=(c["params_ratio"], f), xytext=(c["params_ratio"], a),
                    arrowprops=dict(arrowstyle="->", color=col))
    ax.set_xscale("log")
    ax.set_xlabel("weight compression (x fewer weights, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs compression")
    ax.legend(fontsize=7, loc="lower right")
    labels, flops, eager, lowered = [], [], [], []
    for c in r["compressed"]:
        labels.append(c["name"])
        flops.append(c["flops_ratio"])
        eager.append(c["speedup"])
        lowered.append(c["speedup_lowered"])
    xs = range(len(labels))
    bx.bar([i - 0.27 for i in xs], flops, 0.27, label="FLOPs ratio (theoretical)", color="0.7")
    bx.bar(list(xs), eager, 0.27, label="measured, eager", color="tab:blue")
    bx.bar([i + 0.27 for i in xs], lowered, 0.27, label="measured, lowered", color="tab:green")
    bx.axhline(1.0, color="k", lw=0.8)
    bx.set_xticks(list(xs))
    bx.set_xticklabels([f"{n} ranks" for n in labels])
    bx.set_ylabel("speed-up vs original (batch 1)")
    bx.set_title("speed-up")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
