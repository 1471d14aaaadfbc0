"""Speed of the compressed zoo at realistic sizes: FLOPs cut, time ratio and realisation, side by side.

    python benchmarks/zoo_speed.py                          # every model, rank 0.25, eager
    python benchmarks/zoo_speed.py --models resnet3d18 --inductor --json out.json

Per model: the original (eager), ``tucker_fx.lower`` of the original (the fair baseline: the same
lowering passes, no decomposition), and ``tucker_fx.compress`` at ``--rank`` with the default
config otherwise, timed interleaved in one process (medians and min-max of ``--repeats`` runs).
Realisation = (original time / compressed time) / (FLOPs ratio). ``--ablate STAGES`` also times the
compressed model built without those pipeline stages (comma-separated; bare ``--ablate`` means
``fast_kernels``; ``--ablate cat_into_pointwise,write_in_place`` is the release before those two;
``--ablate native``: without the native kernels of ``tucker_fx.kernels.native``, as on a machine
where they do not build), in the same interleaved run.
With ``--inductor``, the original and the compressed model are also compiled with inductor.
Random weights: right for speed, meaningless for accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

import tucker_fx
from tucker_fx._internal.timing import compare_samples
from tucker_fx.testing.zoo import randomize_norms


def _resnet3d18() -> nn.Module:
    from tucker_fx.testing.resnet3d import resnet3d18
    return resnet3d18()


def _video_unet() -> nn.Module:
    from tucker_fx.testing.video import VideoUNet
    return VideoUNet(width=32, temb=32)


def _thetis() -> nn.Module:
    from tucker_fx.apps.paper.model import thetis_net
    return thetis_net()


def _monai(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from monai.networks import nets
        if name == "resnet10":
            return nets.ResNet("basic", [1, 1, 1, 1], [64, 128, 256, 512], spatial_dims=3, n_input_channels=1,
                               num_classes=2)
        if name == "segresnet":
            return nets.SegResNet(3, init_filters=16, in_channels=1, out_channels=2)
        if name == "unet":
            return nets.UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
                             norm="batch")
        if name == "basic_unet":
            return nets.BasicUNet(3, 1, 2, norm="batch")
        if name == "dynunet":
            return nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                                filters=[32, 64, 128, 256], res_block=True)
        raise ValueError(name)
    return make


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "thetis": (_thetis, (1, 4, 28, 120, 160)),
    "resnet3d18": (_resnet3d18, (1, 3, 16, 112, 112)),
    "monai_resnet10": (_monai("resnet10"), (1, 1, 64, 64, 64)),
    "monai_segresnet": (_monai("segresnet"), (1, 1, 64, 64, 64)),
    "monai_unet": (_monai("unet"), (1, 1, 64, 64, 64)),
    "monai_basic_unet": (_monai("basic_unet"), (1, 1, 64, 64, 64)),
    "monai_dynunet": (_monai("dynunet"), (1, 1, 64, 64, 64)),
    # a latent video diffusion UNet (ResNet blocks, spatio-temporal attention): 8 frames of 64 x 64 latents
    "video_unet": (_video_unet, (1, 4, 8, 64, 64)),
}


def _without_stages(names: list[str]) -> Callable[[], None]:
    """Make the named pipeline stages do nothing; returns the function that restores them."""
    from tucker_fx.passes.cat_pointwise import CatIntoPointwise
    from tucker_fx.passes.fast_kernels import UseFastKernels
    from tucker_fx.passes.inplace import WriteInPlace
    from tucker_fx.passes.norm_fold import FoldNormIntoPointwise
    from tucker_fx.passes.workspace import PlanWorkspace
    from tucker_fx.passes.channels_last_cores import ChannelsLastCores
    from tucker_fx.passes.runner import PassResult
    from tucker_fx.passes.pointwise_chain import FusePointwiseChains
    classes = {"fast_kernels": UseFastKernels, "cat_into_pointwise": CatIntoPointwise, "write_in_place": WriteInPlace,
               "fold_norm_into_pointwise": FoldNormIntoPointwise, "plan_workspace": PlanWorkspace,
               "channels_last_cores": ChannelsLastCores, "fuse_pointwise_chains": FusePointwiseChains}
    if "native" in names:  # not a stage: the library, off while the model is built (and while it runs: _native_off)
        names = [n for n in names if n != "native"]
        off = _native_off()
        off.__enter__()
    else:
        off = None
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise SystemExit(f"--ablate: unknown stage(s) {unknown}; expected some of {sorted(classes)}")
    kept = {n: classes[n].__call__ for n in names}
    for n in names:
        classes[n].__call__ = lambda self, gm: PassResult(gm, False)  # type: ignore[method-assign]

    def restore() -> None:
        for n, call in kept.items():
            classes[n].__call__ = call  # type: ignore[method-assign]
        if off is not None:
            off.__exit__(None, None, None)
    return restore


class _native_off:
    """Within: ``tucker_fx.kernels.native`` reports itself unavailable (the kernels' fallbacks run)."""

    def __enter__(self) -> "_native_off":
        from tucker_fx.kernels import native
        native.available()  # resolve the library first, so that the state can be restored
        self.saved = dict(native._state)
        native._state.update(lib=None, why="off (benchmarks/zoo_speed.py --ablate native)")
        return self

    def __exit__(self, *exc: object) -> None:
        from tucker_fx.kernels import native
        native._state.update(self.saved)


def measure(name: str, rank: float, repeats: int, inductor: bool, ablate: str) -> dict[str, Any]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_norms(factory()).eval()
    x = torch.randn(shape)
    config = tucker_fx.TuckerConfig(rank=rank, progress=False) if name != "thetis" else None  # THETIS: the paper's ranks
    start = time.perf_counter()
    if config is None:
        from tucker_fx.apps.paper.model import thetis_paper_config
        config = thetis_paper_config()
    result = tucker_fx.compress(model, x, config=config)
    compress_s = time.perf_counter() - start
    lowered = tucker_fx.lower(model, x)
    fns: dict[str, Callable[[], Any]] = {"original": lambda: model(x), "lowered original": lambda: lowered(x),
                                         "compressed": lambda: result.module(x)}
    if ablate:
        without = _without_stages(ablate.split(","))
        try:
            before = tucker_fx.compress(model, x, config=config.replace(validate=False)).module
        finally:
            without()
        if "native" in ablate.split(","):
            def run_without() -> Any:
                with _native_off():
                    return before(x)
            fns[f"compressed without {ablate}"] = run_without
        else:
            fns[f"compressed without {ablate}"] = lambda: before(x)
    if inductor:
        torch._dynamo.reset()
        orig_c, comp_c = torch.compile(model), torch.compile(result.module)
        with torch.no_grad():
            orig_c(x), comp_c(x)
        fns["original inductor"] = lambda: orig_c(x)
        fns["compressed inductor"] = lambda: comp_c(x)
    samples = compare_samples(fns, repeats=repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    flops = result.flops_ratio
    row: dict[str, Any] = {
        "model": name, "input": list(shape), "flops_ratio": flops, "params_ratio": result.params_ratio,
        "compress_s": compress_s, "rel_error": result.validation.rel_error if result.validation else None,
        "ms": med, "spread_ms": {k: [min(v), max(v)] for k, v in samples.items()},
        "speedup": med["original"] / med["compressed"],
        "realisation": med["original"] / med["compressed"] / flops,
        "speedup_vs_lowered": med["lowered original"] / med["compressed"],
    }
    if inductor:
        row["speedup_inductor"] = med["original inductor"] / med["compressed inductor"]
    if ablate:
        row["ablated"] = ablate
        row["speedup_ablated"] = med["original"] / med[f"compressed without {ablate}"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    p.add_argument("--rank", type=float, default=0.25, help="rank fraction for every layer (THETIS: paper ranks)")
    p.add_argument("--repeats", type=int, default=9, help="timed runs per variant (interleaved)")
    p.add_argument("--inductor", action="store_true", help="also time inductor compiles of both")
    p.add_argument("--ablate", nargs="?", const="fast_kernels", default="", metavar="STAGES",
                   help="also time the compressed model built without these stages (default: fast_kernels)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}", file=sys.stderr)
    for name in args.models.split(","):
        row = measure(name, args.rank, args.repeats, args.inductor, args.ablate)
        rows.append(row)
        ms = "  ".join(f"{k} {v:.1f}" for k, v in row["ms"].items())
        extra = "".join(f"  {k} x{row[k]:.2f}" for k in ("speedup_ablated", "speedup_inductor") if k in row)
        print(f"{name}: FLOPs x{row['flops_ratio']:.2f}  speed-up x{row['speedup']:.2f}  realisation "
              f"{row['realisation']:.2f}  vs lowered x{row['speedup_vs_lowered']:.2f}{extra}  | ms: {ms}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
