"""The ``tucker-fx`` command line.

    tucker-fx analyze thetis --input-shape 1,4,28,120,160 --format markdown
    tucker-fx analyze mypkg.models:make_net --input-shape 1,3,16,112,112 --format json
    tucker-fx demo [--ranks paper|vbmf] [--json out.json]
    tucker-fx compress resnet3d18 --rank vbmf --plan plan.json
    tucker-fx bench thetis --batch 1 [--compile] [--json out.json]
    tucker-fx train [--resolution 120x160] [--json out.json] [--plot train.png]
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import torch

__all__ = ["main", "build_parser"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
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


def _load(spec: str, shape: Optional[tuple[int, ...]]) -> tuple[torch.nn.Module, tuple[int, ...]]:
    from tucker_fx.models import get_model

    model, default_shape = get_model(spec)
    shape = shape or default_shape
    if shape is None:
        raise SystemExit(f"tucker-fx: error: --input-shape is needed for {spec!r}")
    return model, shape


def _cmd_analyze(args: argparse.Namespace) -> int:
    from tucker_fx.analysis import analyze

    model, shape = _load(args.model, args.input_shape)
    report = analyze(model, torch.empty(shape))
    if args.format == "json":
        print(report.to_json(indent=2))
    else:
        print(report.to_markdown(all_rows=args.all_rows))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from tucker_fx.reporting.table2 import format_table2, table2

    print(f"Compressing the paper's THETIS net ({args.ranks} ranks) and timing it; this takes a few seconds ...",
          file=sys.stderr)
    table = table2(ranks=args.ranks, repeats=args.repeats)
    print(format_table2(table))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from tucker_fx.api import compress
    from tucker_fx.config import TuckerConfig

    model, shape = _load(args.model, args.input_shape)
    rank: object = args.rank
    if rank != "vbmf":
        rank = float(rank) if "." in rank else int(rank)
    config = TuckerConfig(rank=rank, policy=args.policy, progress=False if args.quiet else None)  # type: ignore[arg-type]
    result = compress(model, torch.randn(shape), config=config)
    print(result.summary())
    if args.plan:
        result.plan.save(args.plan)
        print(f"\nwrote the plan to {args.plan}", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from tucker_fx.reporting.bench import VARIANTS, bench, format_bench

    variants = [v for v in VARIANTS if args.compile or not v.endswith("_compiled")]
    if args.variants:
        variants = args.variants.split(",")
    print(f"Building {len(variants)} variants of {args.model} and timing them side by side ...", file=sys.stderr)
    table = bench(args.model, args.batch, args.device, variants=variants, repeats=args.repeats,
                  tune=not args.no_tune, input_shape=args.input_shape)
    print(format_bench(table))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from tucker_fx.reporting.train_demo import check_output_path, format_train_demo, train_demo
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
    "train": _cmd_train,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tucker-fx", description="Tucker-decompose CNNs as an FX graph pass."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="per-layer shapes, params, MACs and FLOPs of a model")
    p.add_argument("model", help="built-in name (thetis, resnet3d18, ...) or package.module:factory")
    p.add_argument("--input-shape", type=_shape, default=None, help="e.g. 1,4,28,120,160")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    p.add_argument("--all-rows", action="store_true", help="also list nodes that cost nothing")
    p = sub.add_parser("demo", help="the paper's Table 2 reproduced and timed on this machine")
    p.add_argument("--ranks", choices=("paper", "vbmf"), default="paper")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p = sub.add_parser("compress", help="compress a model and print the plan and the costs")
    p.add_argument("model", help="built-in name or package.module:factory")
    p.add_argument("--input-shape", type=_shape, default=None)
    p.add_argument("--rank", default="vbmf", help="'vbmf', an int, or a fraction like 0.25")
    p.add_argument("--policy", choices=("paper", "auto"), default="paper")
    p.add_argument("--plan", metavar="PATH", help="save the plan as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-layer progress")
    p = sub.add_parser("bench", help="time a model's variants side by side (original, lowered, Tucker, ...)")
    p.add_argument("model", nargs="?", default="thetis")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--input-shape", type=_shape, default=None)
    p.add_argument("--compile", action="store_true", help="also time inductor-compiled variants (slow to build)")
    p.add_argument("--variants", help="comma-separated subset of the variants")
    p.add_argument("--no-tune", action="store_true", help="choose lowerings by the cost model, not by timing")
    p.add_argument("--json", metavar="PATH")
    from tucker_fx.reporting.train_demo import DEFAULTS as T

    p = sub.add_parser("train", help="train the THETIS net on synthetic THETIS, compress, fine-tune, report accuracy")
    p.add_argument("--resolution", type=_resolution, default=T["resolution"],
                   help=f"HxW of the clips (the paper: 120x160; default {T['resolution'][0]}x{T['resolution'][1]})")
    p.add_argument("--frames", type=int, default=T["frames"])
    p.add_argument("--train-size", type=int, default=T["train_size"])
    p.add_argument("--val-size", type=int, default=T["val_size"], help="validation clips (model selection)")
    p.add_argument("--test-size", type=int, default=T["test_size"], help="test clips (reported accuracy only)")
    p.add_argument("--batch-size", type=int, default=T["batch_size"])
    p.add_argument("--max-epochs", type=int, default=T["max_epochs"], help="training budget of the original")
    p.add_argument("--patience", type=_patience, default=T["patience"],
                   help="stop after this many epochs without a rise in validation accuracy ('none': never)")
    p.add_argument("--target", type=float, default=T["target"],
                   help="accuracy the original should reach (on test); no model stops early below it (on val)")
    p.add_argument("--lr", type=float, default=T["lr"])
    p.add_argument("--finetune-epochs", type=int, default=T["finetune_epochs"], help="fine-tuning budget per model")
    p.add_argument("--finetune-lr", type=float, default=T["finetune_lr"])
    p.add_argument("--seed", type=int, default=T["seed"])
    p.add_argument("--repeats", type=int, default=T["repeats"], help="timed runs per model (median)")
    p.add_argument("--plot", metavar="PATH", default="train_demo.png",
                   help="PNG plot (needs matplotlib; default train_demo.png in the current folder)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-probe", action="store_true", help="skip the linear-probe baseline")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError) as exc:
        print(f"tucker-fx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path that cannot be written, a full disk, ...
        print(f"tucker-fx {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
