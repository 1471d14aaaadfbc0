"""The ``tucker-fx`` command line.

    tucker-fx analyze thetis --input-shape 1,4,28,120,160 --format markdown
    tucker-fx analyze mypkg.models:make_net --input-shape 1,3,16,112,112 --format json
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"analyze": _cmd_analyze}


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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError) as exc:
        print(f"tucker-fx {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
