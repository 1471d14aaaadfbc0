"""The ``tucker-fx`` command line.

    tucker-fx analyze thetis --input-shape 1,4,28,120,160 --format markdown
    tucker-fx analyze mypkg.models:make_net --input-shape 1,3,16,112,112 --format json
    tucker-fx demo [--ranks paper|vbmf] [--json out.json]
    tucker-fx compress resnet3d18 --rank vbmf --plan plan.json
    tucker-fx compress mymodel:make --checkpoint model.pt --input-shape 1,3,8,32,32 --rank 0.5 --save out/
    tucker-fx bench thetis --batch 1 [--compile] [--json out.json]
    tucker-fx bench out/                       # a saved model against its original
    tucker-fx export out/ --format onnx|pt2 [--output PATH] [--dynamic-batch]
    tucker-fx train [--resolution 120x160] [--json out.json] [--plot train.png]

Run ``tucker-fx COMMAND --help`` for each command's options and their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["main", "build_parser"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,28,120,160, got {text!r}")
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def _resolution(text: str) -> tuple[int, int]:
    shape = _shape(text)
    if len(shape) != 2:
        raise argparse.ArgumentTypeError(f"expected HxW like 120x160, got {text!r}")
    return (shape[0], shape[1])


def _patience(text: str) -> Optional[int]:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'none', got {text!r}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
        return value
    return parse


def _rank(text: str) -> object:
    """``vbmf``, an int >= 1, or a fraction in (0, 1]."""
    if text.strip().lower() == "vbmf":
        return "vbmf"
    try:
        value: object = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
    ok = (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0.0 < value <= 1.0)
    if not ok:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, a fraction in (0, 1] like 0.5, or 'vbmf', got {text!r}")
    return value


def _layer_ranks(text: str) -> tuple[str, object]:
    """``NAME=R``, ``NAME=R_s,R_t`` or ``NAME=none`` (leave the layer alone)."""
    name, sep, value = text.partition("=")
    expected = "NAME=R, NAME=R_s,R_t or NAME=none (e.g. layer1.0.conv1=8,16)"
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    if value.strip().lower() == "none":
        return name.strip(), None
    try:
        ranks = [int(v) for v in value.split(",")]
    except ValueError:
        ranks = []
    if len(ranks) not in (1, 2) or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"expected {expected} with ranks >= 1, got {text!r}")
    return name.strip(), (ranks[0] if len(ranks) == 1 else tuple(ranks))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device like cpu, cuda or cuda:1, got {text!r}")
    return text


def _ranks_option(items: Optional[Sequence[Any]]) -> dict[str, object]:
    """``--ranks`` values: NAME=... pairs, or one JSON file ``{"name": [R_s, R_t] | R | null}``."""
    ranks: dict[str, object] = {}
    for item in items or ():
        if isinstance(item, tuple):
            ranks[item[0]] = item[1]
            continue
        try:
            data = json.loads(Path(item).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--ranks: cannot read {item!r} as a JSON file of layer name -> ranks ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"--ranks: {item!r} must hold a JSON object of layer name -> ranks, "
                             f"got {type(data).__name__}")
        ranks.update({k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    return ranks


def _ranks_item(text: str) -> object:
    """One ``--ranks`` value: NAME=... or the path of a JSON file."""
    if "=" in text:
        return _layer_ranks(text)
    if text.endswith(".json") or os.path.isfile(text):
        return text
    return _layer_ranks(text)  # the error message says what is expected


def _import_path() -> None:
    """Resolve ``module:factory`` from the current folder, as ``python -m`` does."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _checkpoint_state(path: str, trust: bool) -> dict[str, torch.Tensor]:
    """The state_dict in ``path``: a plain state_dict, one under a ``state_dict``/``model``/... key, or
    (with ``trust``) the state of a whole pickled model."""
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint: no such file {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code (a whole model), or not a torch file
        if not trust:
            raise ValueError(
                f"--checkpoint: {path!r} is not a tensors-only file (torch.load(weights_only=True) failed: "
                f"{str(exc).splitlines()[0][:160]}); if it is a whole pickled model you trust, pass "
                "--trust-checkpoint (unpickling runs code from the file)") from exc
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            inner = obj.get(key)
            if isinstance(inner, torch.nn.Module):
                return inner.state_dict()
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"--checkpoint: expected a state_dict (name -> tensor), a dict holding one under "
                     f"'state_dict' or 'model', or a pickled nn.Module in {path!r}, got {type(obj).__name__}")


def _load(spec: str, shape: Optional[tuple[int, ...]], *, checkpoint: Optional[str] = None, trust: bool = False,
          device: str = "cpu", dtype: str = "float32") -> tuple[torch.nn.Module, tuple[int, ...]]:
    from tucker_fx.models import get_model

    if ":" in spec:
        _import_path()
    model, default_shape = get_model(spec)
    shape = shape or default_shape
    if shape is None:
        raise ValueError(f"--input-shape: needed for {spec!r} (the example input's shape, e.g. 1,3,16,112,112)")
    if checkpoint:
        state = _checkpoint_state(checkpoint, trust)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:400]
            raise ValueError(f"--checkpoint: {checkpoint!r} does not fit {spec!r}: {first}") from exc
    return model.to(device=device, dtype=DTYPES[dtype]).eval(), shape


def _example(shape: tuple[int, ...], device: str, dtype: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=DTYPES[dtype])


def _compact_wanted(flag: Optional[bool]) -> bool:
    """``--compact``/``--no-compact``, or by default: compact on a terminal narrower than 160 columns."""
    if flag is not None:
        return flag
    return sys.stdout.isatty() and shutil.get_terminal_size((200, 24)).columns < 160


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A plain fixed-width table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _compact_costs(report: Any, all_rows: bool = False) -> str:
    """``CostReport`` as a narrow table, layers by module qualified name (``layer1.0.conv1``)."""
    rows = []
    for r in report.rows:
        if not all_rows and not (r.macs or r.params or r.other_flops or r.kind == "unsupported"):
            continue
        name = r.module if (r.module and r.kind in ("conv", "linear", "conv_transpose")) else r.name
        out = "x".join(map(str, r.out_shape)) if r.out_shape else ""
        rows.append([name, r.kind, out, _si(r.params), _si(r.macs)])
    rows.append(["total", "", "", _si(report.total_params), _si(report.total_macs)])
    return _table(["layer", "kind", "out shape", "params", "MACs"], rows, right=(3, 4))


def _compact_plan(plan: Any) -> str:
    rows = []
    for l in plan.layers:
        ranks = ",".join(map(str, l.ranks)) if l.ranks else "-"
        err = f"{l.weight_error:.2g}" if l.weight_error is not None else ""
        ratio = f"x{l.params_before / l.params_after:.1f}" if l.params_after else "-"
        mratio = f"x{l.macs_before / l.macs_after:.1f}" if l.macs_after else "-"
        note = (l.reason or "")[:40]
        rows.append([l.name, l.kind, ranks, f"{_si(l.params_before)}->{_si(l.params_after)}", ratio, mratio, err,
                     l.lowering or "", note])
    return _table(["layer", "kind", "ranks", "params", "", "MACs", "w.err", "lowering", "note"], rows,
                  right=(4, 5, 6))


def _cmd_analyze(args: argparse.Namespace) -> int:
    from tucker_fx.analysis import analyze

    model, shape = _load(args.model, args.input_shape, checkpoint=args.checkpoint, trust=args.trust_checkpoint)
    report = analyze(model, torch.empty(shape))
    if args.format == "json":
        print(report.to_json(indent=2))
    elif _compact_wanted(args.compact):
        print(_compact_costs(report, all_rows=args.all_rows))
    else:
        print(report.to_markdown(all_rows=args.all_rows))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from tucker_fx.apps.paper.table2 import format_table2, table2

    import time

    start = time.perf_counter()
    print(f"Compressing the paper's THETIS net ({args.ranks} ranks) twice and timing every layer "
          f"({args.repeats} runs each); this takes 15-60 s on a small CPU ...", file=sys.stderr)

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    table = table2(ranks=args.ranks, repeats=args.repeats, say=say)
    say("done")
    print(format_table2(table))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


CLI_MANIFEST = "tucker_fx_cli.json"
"""Written next to ``tucker_fx.json`` by ``compress --save``: how to rebuild the original (model spec,
the folder to import it from, checkpoint, dtype), for ``bench`` and ``export``."""


def _example_inputs(args: argparse.Namespace, shape: tuple[int, ...]) -> torch.Tensor:
    """``--inputs`` (a tensor saved with torch.save: your data) or a seeded random tensor of ``shape``."""
    if getattr(args, "inputs", None):
        try:
            x = torch.load(args.inputs, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"--inputs: cannot read {args.inputs!r} as a tensor saved with torch.save ({exc})") from exc
        if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
            x = x[0]  # (inputs, labels)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"--inputs: expected a tensor (or an (inputs, labels) pair) in {args.inputs!r}, "
                             f"got {type(x).__name__}")
        return x.to(device=args.device, dtype=DTYPES[args.dtype])
    return _example(shape, args.device, args.dtype)


CALIBRATION_CLIPS = 32
"""Synthetic THETIS clips used as calibration data for the built-in THETIS net."""


def _calibration(args: argparse.Namespace, shape: tuple[int, ...]) -> Optional[list[Any]]:
    """The calibration batches of ``compress``: ``--calibration`` (a tensor or list of tensors saved with
    torch.save, or ``package.module:function`` returning an iterable of inputs), else the built-in data of
    a built-in model (synthetic THETIS clips for ``thetis``), else ``--inputs``; ``None`` when there is
    none (a budget then scores on the example input; ``--data-aware`` needs data)."""
    spec = args.calibration
    if spec:
        if ":" in spec and not os.path.exists(spec):
            _import_path()
            module_name, _, fn_name = spec.partition(":")
            try:
                fn = getattr(importlib.import_module(module_name), fn_name)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"--calibration: cannot import {spec!r} ({exc}); expected a file saved with "
                                 "torch.save or package.module:function") from exc
            return [b for b in fn()]
        try:
            data = torch.load(spec, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"--calibration: cannot read {spec!r} as tensors saved with torch.save ({exc})") from exc
        if isinstance(data, torch.Tensor):
            step = max(1, shape[0])
            data = list(data.split(step))
        if not (isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data)):
            raise ValueError(f"--calibration: expected a tensor or a list of tensors in {spec!r}, got "
                             f"{type(data).__name__}")
        return [t.to(device=args.device, dtype=DTYPES[args.dtype]) for t in data]
    if args.model.split(":")[0] == "thetis" and len(shape) == 5:
        from tucker_fx.apps.paper.data import SyntheticThetis

        ds = SyntheticThetis(CALIBRATION_CLIPS, resolution=(shape[3], shape[4]), frames=shape[2], split="train")
        clips = torch.stack([ds[i][0] for i in range(len(ds))]).to(device=args.device, dtype=DTYPES[args.dtype])
        return list(clips.split(8))
    if getattr(args, "inputs", None):
        return [_example_inputs(args, shape)]
    if args.data_aware:
        raise ValueError(f"--data-aware: needs calibration data for {args.model!r}: expected --calibration PATH "
                         "(tensors saved with torch.save) or --calibration package.module:function")
    return None


def _cmd_compress(args: argparse.Namespace) -> int:
    from tucker_fx.api import compress
    from tucker_fx.config import TuckerConfig

    if args.save and os.path.isfile(args.save):
        raise ValueError(f"--save: expected a directory, got the existing file {args.save!r}")
    shape = args.input_shape
    if args.inputs and shape is None:
        shape = (1,)  # the shape comes from the file
    model, shape = _load(args.model, shape, checkpoint=args.checkpoint, trust=args.trust_checkpoint,
                         device=args.device, dtype=args.dtype)
    x = _example_inputs(args, shape)
    targets = {k: getattr(args, k) for k in ("target_speedup", "target_flops_ratio", "target_params_ratio")}
    config = TuckerConfig(rank=args.rank, ranks=_ranks_option(args.ranks), exclude=tuple(args.exclude or ()),  # type: ignore[arg-type]
                          policy=args.policy, lowering=args.lowering, progress=False if args.quiet else None,
                          data_aware=args.data_aware, **targets)
    calibration = None
    if args.data_aware or any(v is not None for v in targets.values()):
        calibration = _calibration(args, tuple(x.shape))
    result = compress(model, x, config=config, calibration=calibration)
    summary = result.summary()
    if _compact_wanted(args.compact):
        markdown = result.plan.to_markdown()
        summary = _compact_plan(result.plan) + (summary[len(markdown):] if summary.startswith(markdown) else "")
    print(summary)
    if args.plan:
        result.plan.save(args.plan)
        print(f"\nwrote the plan to {args.plan}", file=sys.stderr)
    if args.save:
        import tucker_fx

        path = tucker_fx.save(result, args.save)
        module_dir = os.getcwd() if ":" in args.model else None
        facts = {"model": args.model, "module_dir": module_dir, "input_shape": list(x.shape), "dtype": args.dtype,
                 "device": args.device, "rank": args.rank, "lowering": args.lowering,
                 "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None}
        (path / CLI_MANIFEST).write_text(json.dumps(facts, indent=2), encoding="utf-8")
        print(f"\nsaved the compressed model to {path}/ (tucker_fx.json: plan and structure; weights.pt: tensors). "
              f"Next: tucker-fx bench {path}  |  tucker-fx export {path} --format onnx  |  in Python: "
              f"tucker_fx.load({str(path)!r}, model, x)", file=sys.stderr)
    return 0


def _saved_facts(directory: str, option: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tucker_fx.json`` and (when ``compress --save`` wrote it) ``tucker_fx_cli.json`` of a saved model."""
    manifest_path = Path(directory) / "tucker_fx.json"
    if not manifest_path.is_file():
        raise ValueError(f"{option}: expected a folder written by 'tucker-fx compress --save' or tucker_fx.save "
                         f"(with tucker_fx.json), got {directory!r}")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    cli_path = Path(directory) / CLI_MANIFEST
    facts = json.loads(cli_path.read_text(encoding="utf-8")) if cli_path.is_file() else {}
    return manifest, facts


def _load_saved(directory: str, spec: Optional[str], device: str, option: str,
                checkpoint: Optional[str] = None, trust: bool = False, batch: Optional[int] = None,
                ) -> tuple[torch.nn.Module, Any, torch.Tensor, dict[str, Any]]:
    """The original model (with its checkpoint, when known), the saved compressed model loaded onto a fresh
    instance, and an example input of the saved shape (``batch`` replacing its batch size)."""
    import tucker_fx

    manifest, facts = _saved_facts(directory, option)
    spec = spec or facts.get("model")
    if not spec:
        raise ValueError(f"--model: needed: {directory!r} was saved by tucker_fx.save, not by 'tucker-fx compress "
                         "--save'; name the factory that builds the architecture, e.g. --model mymodel:make")
    if facts.get("module_dir") and facts["module_dir"] not in sys.path:
        sys.path.insert(0, facts["module_dir"])
    inputs = manifest["source"]["inputs"]
    if len(inputs) != 1:
        raise ValueError(f"{option}: the CLI handles models of one input tensor; {directory!r} has {len(inputs)} "
                         "(use tucker_fx.load and tucker_fx.deploy from Python)")
    shape, dtype = tuple(inputs[0]["shape"]), inputs[0]["dtype"]
    if dtype not in DTYPES:
        raise ValueError(f"{option}: the saved model's input has dtype {dtype}; the CLI handles {sorted(DTYPES)}")
    checkpoint = checkpoint or facts.get("checkpoint")
    original, _ = _load(spec, shape, checkpoint=checkpoint, trust=trust, device=device, dtype=dtype)
    fresh, _ = _load(spec, shape, device=device, dtype=dtype)
    x = _example(shape, device, dtype)
    result = tucker_fx.load(directory, fresh, x)
    if batch is not None and batch != shape[0]:
        x = _example((batch, *shape[1:]), device, dtype)
    info = {"model": spec, "checkpoint": checkpoint, "capture": manifest.get("capture"), "dtype": dtype}
    return original, result, x, info


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _bench_own(args: argparse.Namespace) -> int:
    """``bench`` of your model: the original (with --checkpoint) against a saved folder and/or --rank."""
    import tucker_fx
    from tucker_fx._internal.timing import compare_ms

    saved = args.compressed
    spec: Optional[str] = args.model
    if spec and os.path.isdir(spec):
        saved, spec = spec, None
    built: dict[str, torch.nn.Module] = {}
    params: dict[str, int] = {}
    if saved:
        original, result, x, info = _load_saved(saved, spec, args.device, "--compressed", args.checkpoint,
                                                args.trust_checkpoint, args.batch)
        spec = info["model"]
        built[f"saved ({saved})"] = result.module
        params[f"saved ({saved})"] = sum(p.numel() for p in result.module.parameters())
    else:
        original, shape = _load(spec or "thetis", args.input_shape, checkpoint=args.checkpoint,
                                trust=args.trust_checkpoint, device=args.device, dtype=args.dtype)
        x = _example((args.batch or shape[0], *shape[1:]), args.device, args.dtype)
    if not args.checkpoint and not (saved and info["checkpoint"]):
        print("note: no --checkpoint: the original has the factory's initial weights", file=sys.stderr)
    if args.rank is not None:
        print(f"compressing {spec} at rank {args.rank} ...", file=sys.stderr)
        r = tucker_fx.compress(original, x, config=tucker_fx.TuckerConfig(rank=args.rank, progress=False,  # type: ignore[arg-type]
                                                                           validate=False))
        built[f"rank {args.rank}"] = r.module
        params[f"rank {args.rank}"] = sum(p.numel() for p in r.module.parameters())
    variants = {"original": original, **built}
    params["original"] = sum(p.numel() for p in original.parameters())
    with torch.no_grad():
        outputs = {k: m(x) for k, m in variants.items()}
    print(f"Timing {len(variants)} variants of {spec} side by side ({args.repeats} interleaved runs each) ...",
          file=sys.stderr)
    times = compare_ms({k: (lambda m=m: m(x)) for k, m in variants.items()}, repeats=args.repeats, warmup=2)
    base = times["original"]
    rows = [[k, f"{times[k]:.3f}", f"x{base / times[k]:.2f}", f"{params[k]:,}",
             "" if k == "original" else f"{_rel_error(outputs['original'], outputs[k]):.3g}"] for k in variants]
    print(f"{spec}, input {'x'.join(map(str, x.shape))} {str(x.dtype).replace('torch.', '')} on {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    print(_table(["variant", "median ms", "speed-up", "params", "output rel. error"], rows, right=(1, 2, 3, 4)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": spec, "input_shape": list(x.shape), "device": args.device, "repeats": args.repeats,
                       "variants": {k: {"ms": times[k], "speedup_vs_original": base / times[k], "params": params[k],
                                        "rel_error": _rel_error(outputs["original"], outputs[k])} for k in variants}},
                      f, indent=2)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import contextlib

    from tucker_fx.deploy import ExportCheck, to_onnx, to_pt2

    output = Path(args.output) if args.output else Path(args.directory) / f"model.{args.format}"
    if output.is_dir():
        raise ValueError(f"--output: expected a file path, got the folder {str(output)!r}")
    _, result, x, info = _load_saved(args.directory, args.model, args.device, "DIRECTORY")
    check = ExportCheck()
    print(f"exporting {args.directory} ({info['model']}, input {'x'.join(map(str, x.shape))} {info['dtype']}) "
          f"to {args.format} ...", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # torch.onnx's step-by-step messages
        if args.format == "onnx":
            swapped = to_onnx(result.module, x, output, dynamic_batch=args.dynamic_batch, max_batch=args.max_batch,
                              check=check)
        else:
            swapped = []
            to_pt2(result.module, x, output, dynamic_batch=args.dynamic_batch, max_batch=args.max_batch, check=check)
    if swapped:
        print(f"note: ONNX has no complex tensors: the FFT-lowered layer(s) {', '.join(swapped)} were exported as "
              "plain convolutions (same weights; compress with --lowering none to keep them so in PyTorch too)",
              file=sys.stderr)
    batch = "any batch >= 1" + (f" up to {args.max_batch}" if args.max_batch else "") if args.dynamic_batch \
        else f"batch {x.shape[0]} only (--dynamic-batch for any batch)"
    how = ("onnxruntime.InferenceSession(path).run(None, {name: x})" if args.format == "onnx"
           else "torch.export.load(path).module()(x)")
    checked = f"; checked against the PyTorch model: {check}" if check.errors else \
        "; not run (pip install onnxruntime to check it)"
    print(f"wrote {output} (input {'x'.join(map(str, x.shape[1:]))} per sample, {batch}{checked}). Load it with {how}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from tucker_fx.apps.bench import VARIANTS, bench, format_bench

    if args.compressed or args.checkpoint or args.rank is not None or (args.model and os.path.isdir(args.model)):
        return _bench_own(args)
    if args.model and ":" in args.model:
        _import_path()
    variants = [v for v in VARIANTS if args.compile or not v.endswith("_compiled")]
    if args.variants:
        variants = args.variants.split(",")
    print(f"Building {len(variants)} variants of {args.model} and timing them side by side ...", file=sys.stderr)
    table = bench(args.model, args.batch or 1, args.device, variants=variants, repeats=args.repeats,
                  tune=not args.no_tune, input_shape=args.input_shape)
    print(format_bench(table))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from tucker_fx.apps.paper.train_demo import check_output_path, format_train_demo, train_demo
    from tucker_fx.training.distributed import env_rank

    plot = None if args.no_plot else args.plot
    for path, what in ((args.json, "--json"), (plot, "--plot")):  # fail now, not after minutes of training
        if path:
            check_output_path(path, what)
    lead = env_rank() == 0  # under torchrun, only rank 0 prints the report and writes files
    result = train_demo(
        resolution=args.resolution, frames=args.frames, train_size=args.train_size, val_size=args.val_size,
        test_size=args.test_size, batch_size=args.batch_size, max_epochs=args.max_epochs, patience=args.patience,
        target=args.target, lr=args.lr, finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
        seed=args.seed, repeats=args.repeats, probe=not args.no_probe, plot=plot, quiet=args.quiet,
    )
    if not lead:
        return 0
    print(format_train_demo(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "analyze": _cmd_analyze, "demo": _cmd_demo, "compress": _cmd_compress, "bench": _cmd_bench,
    "export": _cmd_export, "train": _cmd_train,
}


def _float_at_least(low: float, strict: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g}, got {text!r}")
        return value
    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" not in text and "%(default)" not in text and default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            shown = "x".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default: {shown})".replace("%", "%%")
        return text


class _Parser(argparse.ArgumentParser):
    """Bad values: one line on stderr (``tucker-fx compress: error: argument --rank: ...``), exit code 2."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add(p: argparse.ArgumentParser, name: str) -> None:
    """Options several commands share."""
    if name == "model":
        p.add_argument("model", help="a built-in name (thetis, resnet3d18, conv2d, ...) or package.module:factory, "
                                     "resolved from the current folder (mymodel:make for ./mymodel.py)")
    elif name == "input-shape":
        p.add_argument("--input-shape", type=_shape, default=None, metavar="N,C,...",
                       help="the example input's shape, e.g. 1,3,16,112,112 (default: the built-in model's; "
                            "needed for package.module:factory)")
    elif name == "checkpoint":
        p.add_argument("--checkpoint", metavar="PATH", default=None,
                       help="weights to load into the model: a state_dict saved with torch.save (or a dict holding "
                            "one under 'state_dict'/'model'; default: the factory's own weights)")
        p.add_argument("--trust-checkpoint", action="store_true",
                       help="allow a --checkpoint that is a whole pickled model (unpickling runs code from the file)")
    elif name == "device":
        p.add_argument("--device", type=_device, default="cpu", help="where to run: cpu, cuda, cuda:1, ...")
    elif name == "dtype":
        p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the model's and the input's dtype")
    elif name == "compact":
        p.add_argument("--compact", action=argparse.BooleanOptionalAction, default=None,
                       help="a narrow plain-text table instead of Markdown (default: on a terminal narrower than "
                            "160 columns)")


def build_parser() -> argparse.ArgumentParser:
    from tucker_fx import __version__

    parser = _Parser(prog="tucker-fx", description="Tucker-decompose CNNs as an FX graph pass.",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"tucker-fx {__version__} (torch {torch.__version__})",
                        help="print the versions of tucker_fx and torch and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    p = command("analyze", "per-layer shapes, params, MACs and FLOPs of a model")
    _add(p, "model")
    _add(p, "input-shape")
    _add(p, "checkpoint")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown", help="the output format")
    _add(p, "compact")
    p.add_argument("--all-rows", action="store_true", help="also list nodes that cost nothing")

    p = command("demo", "the paper's Table 2 reproduced and timed on this machine (about 15-60 s on a small CPU)")
    p.add_argument("--ranks", choices=("paper", "vbmf"), default="paper",
                   help="the paper's ranks, or ranks chosen by EVBMF")
    p.add_argument("--repeats", type=_int_at_least(1), default=7, help="timed runs per measurement (median)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")

    p = command("compress", "compress a model, print the plan and the costs, save it")
    _add(p, "model")
    _add(p, "input-shape")
    _add(p, "checkpoint")
    p.add_argument("--inputs", metavar="PATH", default=None,
                   help="a batch of your data saved with torch.save(tensor, PATH): the example input and what "
                        "the result is validated on (default: a seeded random tensor of --input-shape)")
    p.add_argument("--rank", type=_rank, default="vbmf",
                   help="'vbmf' (chosen per layer by EVBMF), an int (both modes) or a fraction in (0, 1] of each "
                        "mode's full rank")
    p.add_argument("--ranks", type=_ranks_item, nargs="+", metavar="NAME=R[,R2]", default=None,
                   help="per-layer ranks overriding --rank: NAME=R (Tucker-1/SVD), NAME=R_s,R_t (Tucker-2), "
                        "NAME=none (leave it alone), or a JSON file {\"name\": [R_s, R_t] | R | null}")
    p.add_argument("--exclude", nargs="+", metavar="NAME", default=None,
                   help="layers never to touch: names or glob patterns like 'layer4.*'")
    p.add_argument("--policy", choices=("paper", "auto"), default="paper",
                   help="'paper': Tucker-1 on the first conv and SVD on later linears, Tucker-2 elsewhere; "
                        "'auto': the cheapest kind at the chosen ranks")
    p.add_argument("--lowering", choices=("auto", "none"), default="auto",
                   help="'auto': each block runs as its fastest variant (direct, FFT, ...); 'none': the plain "
                        "three-conv chain (exports to ONNX as it is)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-speedup", type=_float_at_least(1.0), default=None, metavar="X",
                        help="choose each layer's ranks (or leave it alone) for this measured speed-up at the example "
                             "input, with the least loss on the calibration data (default: no target)")
    target.add_argument("--target-flops-ratio", type=_float_at_least(1.0), default=None, metavar="X",
                        help="the same for a FLOPs cut (before / after; default: no target)")
    target.add_argument("--target-params-ratio", type=_float_at_least(1.0), default=None, metavar="X",
                        help="the same for a parameter cut (before / after; default: no target)")
    p.add_argument("--data-aware", action="store_true",
                   help="fit the factors to the layers' responses on calibration data, not only to the weights "
                        "(default: off)")
    p.add_argument("--calibration", metavar="PATH|module:function", default=None,
                   help="calibration data for --data-aware and the --target-* search: tensors saved with torch.save "
                        "(split into batches of the input's batch size) or package.module:function returning an "
                        "iterable of inputs (default: synthetic clips for 'thetis', else --inputs)")
    _add(p, "device")
    _add(p, "dtype")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="save the compressed model (tucker_fx.save: plan, structure, weights) to this folder")
    p.add_argument("--plan", metavar="PATH", help="also save the plan alone as JSON")
    _add(p, "compact")
    p.add_argument("--quiet", action="store_true", help="no per-layer progress on stderr")

    p = command("bench", "time a model's variants side by side: built-in variants (original, lowered, Tucker, ...), "
                         "or your model against a saved folder (bench out/) or --rank")
    p.add_argument("model", nargs="?", default="thetis",
                   help="a built-in name, package.module:factory, or a folder saved by 'compress --save'")
    p.add_argument("--compressed", metavar="DIR", default=None,
                   help="a folder saved by 'compress --save' to time against the original MODEL")
    p.add_argument("--rank", type=_rank, default=None,
                   help="also compress MODEL at this rank ('vbmf', an int or a fraction in (0, 1]) and time it")
    _add(p, "checkpoint")
    p.add_argument("--batch", type=_int_at_least(1), default=None,
                   help="batch size of the timed input (default: 1, or the saved model's)")
    _add(p, "device")
    _add(p, "dtype")
    p.add_argument("--repeats", type=_int_at_least(1), default=11, help="timed runs per variant (median)")
    _add(p, "input-shape")
    p.add_argument("--compile", action="store_true", help="also time inductor-compiled variants (slow to build)")
    p.add_argument("--variants", metavar="A,B,...",
                   help="comma-separated subset of the built-in variants: original, original_lowered, "
                        "original_compiled, tucker, tucker_lowered, tucker_compiled (default: all but compiled)")
    p.add_argument("--no-tune", action="store_true", help="choose lowerings by the cost model, not by timing")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")

    p = command("export", "turn a folder saved by 'compress --save' into a deployable .onnx or .pt2 file")
    p.add_argument("directory", metavar="DIR", help="the folder saved by 'tucker-fx compress --save'")
    p.add_argument("--format", choices=("onnx", "pt2"), default="pt2",
                   help="'onnx' (needs pip install 'tucker_fx[export]') or 'pt2' (torch.export.save)")
    p.add_argument("--output", metavar="PATH", default=None, help="the file to write (default: DIR/model.FORMAT)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="accept any batch size >= 1 (default: the saved example's batch only)")
    p.add_argument("--max-batch", type=_int_at_least(2), default=None,
                   help="with --dynamic-batch, the largest batch accepted (default: no limit)")
    p.add_argument("--model", metavar="MODULE:FACTORY", default=None,
                   help="the factory of the architecture (default: the one 'compress --save' recorded)")
    _add(p, "device")

    from tucker_fx.apps.paper.train_demo import DEFAULTS as T

    p = command("train", "train the THETIS net on synthetic THETIS, compress, fine-tune, report accuracy")
    p.add_argument("--resolution", type=_resolution, default=T["resolution"],
                   help="HxW of the clips (the paper: 120x160)")
    p.add_argument("--frames", type=_int_at_least(1), default=T["frames"], help="frames per clip")
    p.add_argument("--train-size", type=_int_at_least(1), default=T["train_size"], help="training clips")
    p.add_argument("--val-size", type=_int_at_least(1), default=T["val_size"], help="validation clips (model selection)")
    p.add_argument("--test-size", type=_int_at_least(1), default=T["test_size"], help="test clips (reported accuracy only)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=T["batch_size"], help="clips per training step")
    p.add_argument("--max-epochs", type=_int_at_least(1), default=T["max_epochs"], help="training budget of the original")
    p.add_argument("--patience", type=_patience, default=T["patience"],
                   help="stop after this many epochs without a rise in validation accuracy ('none': never)")
    p.add_argument("--target", type=_float_at_least(0.0), default=T["target"],
                   help="accuracy the original should reach (on test); no model stops early below it (on val)")
    p.add_argument("--lr", type=_float_at_least(0.0, strict=True), default=T["lr"], help="learning rate of the original")
    p.add_argument("--finetune-epochs", type=_int_at_least(0), default=T["finetune_epochs"],
                   help="fine-tuning budget per model")
    p.add_argument("--finetune-lr", type=_float_at_least(0.0, strict=True), default=T["finetune_lr"],
                   help="learning rate of fine-tuning")
    p.add_argument("--seed", type=int, default=T["seed"], help="seed of the data and the weights")
    p.add_argument("--repeats", type=_int_at_least(1), default=T["repeats"], help="timed runs per model (median)")
    p.add_argument("--plot", metavar="PATH", default="train_demo.png",
                   help="PNG plot (needs matplotlib), in the current folder unless a path is given")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--no-probe", action="store_true", help="skip the linear-probe baseline")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())  # one line
        print(f"tucker-fx {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path that cannot be written, a full disk, ...
        print(f"tucker-fx {args.command}: error: {exc}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    raise SystemExit(main())
