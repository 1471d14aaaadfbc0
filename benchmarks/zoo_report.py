"""The real-model zoo (tucker_fx.testing.zoo) through the whole pipeline, as markdown tables.

    python benchmarks/zoo_report.py [--models a,b] [--inductor] [--json PATH] [--threads N]

Per model: how it can be captured (``torch.fx.symbolic_trace``, ``torch.export.export(strict=False)``);
the backend (``torch.compile(backend="tucker")``, full rank, ``only_if_cheaper=False``) per inner
compiler: Dynamo graphs, layers decomposed, relative error against the eager model; ``tucker_fx.compress``
at full rank (layers, error against the model itself, computed here) and at rank 0.5 (params and FLOPs
before/after, the error computed here and the one ``result.validation`` reports, compress time).
A step that fails shows its exception type and first line in the failures table. Weights are seeded,
so the tables are reproducible (times aside).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch._dynamo

import tucker_fx
from tucker_fx.backend.dynamo import tucker_backend
from tucker_fx.testing.zoo import ZOO, available, build, rel_error

FULL = {"rank": 1.0, "only_if_cheaper": False, "progress": False}


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def _step(row: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on an exception record its reason under ``failures[key]`` and return None."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a report: every failure is a row
        row["failures"][key] = _reason(exc)
        if row.get("_verbose"):
            traceback.print_exc()
        return None


def _trace_check(model: torch.nn.Module, x: torch.Tensor) -> str:
    """``yes`` if symbolic_trace's graph runs and matches the model on ``x``, else why not (a trace
    that specialises on a branch or a shape raises or differs here)."""
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ref = model(x)
        try:
            out = traced(x)
        except Exception as exc:  # noqa: BLE001
            return f"**traces, does not run** ({type(exc).__name__})"
    err = rel_error(ref, out)
    return "yes" if err < 1e-5 else f"**traces, wrong** (error {err:.1e})"


def _backend_run(model: torch.nn.Module, x: torch.Tensor, inner: str) -> dict[str, Any]:
    torch._dynamo.reset()
    reports: list[Any] = []
    graphs = [0]
    options = {**FULL, "inner": inner, "on_report": reports.append}

    def counting(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs[0] += 1
        return tucker_backend(gm, example_inputs, options=options)

    compiled = torch.compile(model, backend=counting)
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    return {"graphs": graphs[0], "layers": sum(len(r.plan.applied) for r in reports),
            "error": rel_error(ref, out), "seconds": seconds}


def _compress_full(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    result = tucker_fx.compress(model, x, config=tucker_fx.TuckerConfig(**FULL))
    with torch.no_grad():
        ref, out = model(x), result.module(x)
    return {"layers": len(result.plan.applied), "error": rel_error(ref, out)}


_RELOAD = """
import sys, torch, tucker_fx
from tucker_fx.testing.zoo import build, rel_error
model, x = build(sys.argv[1])
saved = torch.load(sys.argv[3], weights_only=True)
with torch.no_grad():
    out = tucker_fx.load(sys.argv[2], model, x).module(x)
print(rel_error(saved, out))
"""


def _reload_error(name: str, result: Any, x: torch.Tensor) -> float:
    """Save the result, load it in a fresh process on a fresh model, and compare the outputs."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = tucker_fx.save(result, tmp + "/saved")
        with torch.no_grad():
            torch.save(result.module(x), tmp + "/out.pt")
        done = subprocess.run([sys.executable, "-c", _RELOAD, name, str(path), tmp + "/out.pt"],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "reload failed")
        return float(done.stdout.strip().splitlines()[-1])


def _compress_half(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    start = time.perf_counter()
    result = tucker_fx.compress(model, x, config=tucker_fx.TuckerConfig(rank=0.5, progress=False))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref, out = model(x), result.module(x)
    return {"capture": result.capture, "reload_error": _reload_error(name, result, x),
            "layers": len(result.plan.applied), "candidates": len(result.plan.layers),
            "params_before": result.before.total_params, "params_after": result.after.total_params,
            "flops_before": result.before.total_flops, "flops_after": result.after.total_flops,
            "error": rel_error(ref, out),
            "validation_error": None if result.validation is None else result.validation.rel_error,
            "seconds": seconds}


def measure(name: str, inners: tuple[str, ...], verbose: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "failures": {}, "_verbose": verbose}
    if not available(name):
        row["failures"]["build"] = f"needs {', '.join(ZOO[name].requires)}"
        return row
    built = _step(row, "build", lambda: build(name))
    if built is None:
        return row
    model, x = built
    row["input"] = "x".join(map(str, x.shape))
    row["params"] = sum(p.numel() for p in model.parameters())
    row["symbolic_trace"] = _step(row, "symbolic_trace", lambda: _trace_check(model, x))
    row["export"] = _step(row, "export", lambda: torch.export.export(model, (x,), strict=False)) is not None
    for inner in inners:
        row[f"backend_{inner}"] = _step(row, f"backend[{inner}]", lambda: _backend_run(model, x, inner))
    row["compress_full"] = _step(row, "compress(rank=1.0)", lambda: _compress_full(model, x))
    row["compress_half"] = _step(row, "compress(rank=0.5)", lambda: _compress_half(name, model, x))
    del row["_verbose"]
    return row


def _yes(v: Any) -> str:
    return "yes" if v else "**no**"


def _err(v: Any) -> str:
    return "-" if v is None else f"{v:.1e}"


def _flt(d: Any, key: str, fmt: str = "{}") -> str:
    return "-" if not d else fmt.format(d[key])


def to_markdown(rows: list[dict[str, Any]], inners: tuple[str, ...]) -> str:
    out = ["### Capture, backend at full rank, compress at full rank", ""]
    head = ["model", "input", "params", "symbolic_trace", "export"]
    for inner in inners:
        head += [f"graphs ({inner})", f"layers ({inner})", f"error ({inner})"]
    head += ["layers (compress)", "error (compress)"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "input" not in r:
            out.append(f"| {r['model']} |" + " - |" * (len(head) - 1))
            continue
        cells = [r["model"], r["input"], f"{r['params']:,}", r["symbolic_trace"] or "**no**", _yes(r["export"])]
        for inner in inners:
            b = r.get(f"backend_{inner}")
            cells += [_flt(b, "graphs"), _flt(b, "layers"), _err(b and b["error"])]
        c = r.get("compress_full")
        cells += [_flt(c, "layers"), _err(c and c["error"])]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "### compress at rank 0.5 (default config otherwise)", ""]
    head = ["model", "capture", "layers / candidates", "params before", "params after", "GFLOPs before",
            "GFLOPs after", "error vs model", "validation error", "compress s", "save/load in a new process"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        h = r.get("compress_half")
        if not h:
            out.append(f"| {r['model']} |" + " - |" * (len(head) - 1))
            continue
        out.append(f"| {r['model']} | {h['capture']} | {h['layers']} / {h['candidates']} | {h['params_before']:,} | "
                   f"{h['params_after']:,} | {h['flops_before'] / 1e9:.4f} | {h['flops_after'] / 1e9:.4f} | "
                   f"{_err(h['error'])} | {_err(h['validation_error'])} | {h['seconds']:.2f} | "
                   f"{_err(h['reload_error'])} |")
    failures = [(r["model"], k, v) for r in rows for k, v in r["failures"].items()]
    out += ["", "### Failures", ""]
    if failures:
        out += ["| model | step | exception |", "|---|---|---|"]
        out += [f"| {m} | {k} | {v.replace('|', '/')} |" for m, k, v in failures]
    else:
        out.append("none")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    parser.add_argument("--inductor", action="store_true", help="also compile with inner='inductor' (slow)")
    parser.add_argument("--json", default=None, help="write the rows as JSON to this path")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures to stderr")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()] or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown zoo models {unknown}: expected some of {sorted(ZOO)}")
    torch.set_num_threads(args.threads)
    inners = ("eager", "aot_eager") + (("inductor",) if args.inductor else ())
    rows = []
    for name in names:
        start = time.perf_counter()
        rows.append(measure(name, inners, args.verbose))
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(to_markdown(rows, inners))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
