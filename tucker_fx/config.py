"""The one frozen config of ``tucker_fx.compress``.

Example:
    >>> from tucker_fx import TuckerConfig
    >>> cfg = TuckerConfig(rank=0.5, ranks={"c1": (2, 2), "l3": None})
    >>> cfg.rank, dict(cfg.ranks)
    (0.5, {'c1': (2, 2), 'l3': None})
    >>> TuckerConfig(rank=0)
    Traceback (most recent call last):
    ...
    ValueError: TuckerConfig.rank: expected 'vbmf', an int >= 1 or a float in (0, 1], got 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

from tucker_fx.decomposition.tucker import SOLVERS

__all__ = ["TuckerConfig", "RankSpec", "LayerRanks"]

RankSpec = Union[str, int, float]
LayerRanks = Union[tuple[int, int], int, None]

POLICIES = ("paper", "auto")
TARGETS = ("target_speedup", "target_flops_ratio", "target_params_ratio")
LOWERING_MODES = ("auto", "none")


def _check_layer_ranks(name: str, value: Any) -> LayerRanks:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"TuckerConfig.ranks[{name!r}]: expected (R_s, R_t), an int or None, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"TuckerConfig.ranks[{name!r}]: expected ranks >= 1, got {value}")
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(
                f"TuckerConfig.ranks[{name!r}]: expected (R_s, R_t) for Tucker-2 or one int for "
                f"Tucker-1/SVD, got {value!r} ({len(value)} values)"
            )
        if min(value) < 1:
            raise ValueError(f"TuckerConfig.ranks[{name!r}]: expected ranks >= 1, got {tuple(value)}")
        return (int(value[0]), int(value[1]))
    raise ValueError(f"TuckerConfig.ranks[{name!r}]: expected (R_s, R_t), an int or None, got {value!r}")


@dataclass(frozen=True)
class TuckerConfig:
    """How to compress.

    Attributes:
        rank: ``"vbmf"`` (EVBMF on each mode's unfolding), an int (both modes, clipped to
            full rank) or a float in (0, 1] (that fraction of each mode's full rank, rounded up).
        ranks: per-layer overrides by module qualified name (node name for functional
            layers): ``(R_s, R_t)`` for Tucker-2, an int for Tucker-1 (conv) / SVD (linear),
            ``None`` to leave the layer alone.
        policy: ``"paper"`` (Algorithm 1: Tucker-1 on the first conv and on every linear after
            the first, Tucker-2 elsewhere, the first linear as a conv when it follows a flatten)
            or ``"auto"`` (the cheapest kind at the chosen ranks).
        min_rank: floor for selected ranks (EVBMF may return 0 on noise-like weights).
        only_if_cheaper: leave a layer alone unless decomposing lowers both MACs and params.
        exclude: glob patterns of layer names never to touch (``"layer4.*"``).
        layer_filter: a callable ``name -> bool``; layers where it is False are left alone.
        hooi_iters: HOOI sweeps after the HOSVD start of Tucker-2.
        tucker_solver: ``"gram"`` (default: HOSVD + HOOI on the small Gram matrices, ~5x faster)
            or ``"tensorly"`` (tensorly's ``partial_tucker``, run inside
            ``tensorly.backend_context``; the reference implementation).
        validate: compare the compressed model with the original on the example inputs.
        progress: per-layer progress on stderr: ``True``, ``False`` (quiet), or ``None``
            (shown once compressing has taken over a second).
        fold_bn: fold eval-mode BatchNorm into the conv/linear before it, before decomposing.
        lowering: ``"auto"`` (each block runs as its fastest variant: direct, channels_last,
            FFT, absorbed, or the original layer) or ``"none"`` (the plain three-conv chain).
        tune: with ``lowering="auto"``, choose by timing the candidates at the real input shape
            on the real device (cached on disk); ``False`` (default: fast and deterministic) ranks
            them with the cost model.
        tuning_repeats: timed runs per candidate (median).
        tuning_cache: ``True`` (``~/.cache/tucker_fx`` or ``$TUCKER_FX_CACHE_DIR``), a file path,
            or ``False`` (no cache).
        merge: merge adjacent linear maps (1x1 conv pairs, Linear pairs, ...) when MACs drop.
        lowering_tolerance: a lowered variant must match the block's output to this relative error.
        inductor: also hand the result to ``torch.compile`` (``CompressionResult.compiled``).
        keep_original_if_faster: with ``tune=True``, put the original layer back when it is
            measured faster than every decomposed variant (by > 0.05 ms and > 10%); ``False``
            keeps the compression whatever the timing says.
        data_aware: fit the factors to the layer's data, not only its weights: the output factor from
            the covariance of the layer's responses on ``calibration`` data, the input factor weighted
            by the input's channel covariance (``compress(..., calibration=...)`` is then required).
        target_speedup: choose the ranks per layer (including "leave this layer alone") for this
            measured speed-up at the example inputs with the least predicted loss; the result is
            timed and the allocation tightened when the target is missed.
        target_flops_ratio: the same for a FLOPs cut (``FLOPs before / after`` of the whole model).
        target_params_ratio: the same for a parameter cut. At most one ``target_*``; ``rank``
            then only sets the largest rank tried.
        max_metric_drop: with ``compress(..., evaluate=fn)``: the most the metric may fall
            (``fn(original) - fn(compressed)``); with a target the result is checked against it
            (a warning), without one the search picks the most compression within it.
        speed_check: after compressing, time the compressed model against the original at the
            example inputs (a few interleaved runs; ``CompressionResult.timing``) and warn, with the
            figures, when it is slower; with ``inductor=True`` also time the compiled module and
            keep it in ``CompressionResult.compiled`` only if it beats the eager one.
    """

    rank: RankSpec = "vbmf"
    ranks: Mapping[str, LayerRanks] = field(default_factory=dict)
    policy: str = "paper"
    min_rank: int = 1
    only_if_cheaper: bool = True
    exclude: tuple[str, ...] = ()
    layer_filter: Optional[Callable[[str], bool]] = None
    hooi_iters: int = 2
    tucker_solver: str = "gram"
    validate: bool = True
    progress: Optional[bool] = None
    fold_bn: bool = True
    lowering: str = "auto"
    tune: bool = False
    tuning_repeats: int = 5
    tuning_cache: Union[bool, str] = True
    merge: bool = True
    lowering_tolerance: float = 1e-5
    inductor: bool = False
    keep_original_if_faster: bool = True
    speed_check: bool = True
    data_aware: bool = False
    target_speedup: Optional[float] = None
    target_flops_ratio: Optional[float] = None
    target_params_ratio: Optional[float] = None
    max_metric_drop: Optional[float] = None

    def __post_init__(self) -> None:
        r = self.rank
        ok = (
            r == "vbmf"
            or (isinstance(r, int) and not isinstance(r, bool) and r >= 1)
            or (isinstance(r, float) and math.isfinite(r) and 0.0 < r <= 1.0)
        )
        if not ok:
            raise ValueError(
                f"TuckerConfig.rank: expected 'vbmf', an int >= 1 or a float in (0, 1], got {r!r}"
            )
        if not isinstance(self.ranks, Mapping):
            raise ValueError(f"TuckerConfig.ranks: expected a dict of layer name -> ranks, got {type(self.ranks).__name__}")
        checked = {str(k): _check_layer_ranks(str(k), v) for k, v in self.ranks.items()}
        object.__setattr__(self, "ranks", MappingProxyType(checked))
        if self.policy not in POLICIES:
            raise ValueError(f"TuckerConfig.policy: expected one of {POLICIES}, got {self.policy!r}")
        if not isinstance(self.min_rank, int) or isinstance(self.min_rank, bool) or self.min_rank < 1:
            raise ValueError(f"TuckerConfig.min_rank: expected an int >= 1, got {self.min_rank!r}")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        if not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"TuckerConfig.exclude: expected glob strings, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.layer_filter is not None and not callable(self.layer_filter):
            raise ValueError(f"TuckerConfig.layer_filter: expected a callable name -> bool, got {self.layer_filter!r}")
        if not isinstance(self.hooi_iters, int) or isinstance(self.hooi_iters, bool) or self.hooi_iters < 0:
            raise ValueError(f"TuckerConfig.hooi_iters: expected an int >= 0, got {self.hooi_iters!r}")
        if self.tucker_solver not in SOLVERS:
            raise ValueError(f"TuckerConfig.tucker_solver: expected one of {SOLVERS}, got {self.tucker_solver!r}")
        if self.lowering not in LOWERING_MODES:
            raise ValueError(f"TuckerConfig.lowering: expected one of {LOWERING_MODES}, got {self.lowering!r}")
        if not isinstance(self.tuning_repeats, int) or isinstance(self.tuning_repeats, bool) or self.tuning_repeats < 1:
            raise ValueError(f"TuckerConfig.tuning_repeats: expected an int >= 1, got {self.tuning_repeats!r}")
        if not isinstance(self.tuning_cache, (bool, str)):
            raise ValueError(f"TuckerConfig.tuning_cache: expected True, False or a file path, got {self.tuning_cache!r}")
        tol = self.lowering_tolerance
        if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"TuckerConfig.lowering_tolerance: expected a positive number, got {self.lowering_tolerance!r}")
        targets = [n for n in TARGETS if getattr(self, n) is not None]
        for name in targets:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1.0:
                raise ValueError(f"TuckerConfig.{name}: expected a number >= 1 (a ratio: before / after), got {v!r}")
        if len(targets) > 1:
            raise ValueError(f"TuckerConfig: expected at most one of {TARGETS}, got {targets}")
        if targets and self.ranks:
            raise ValueError(f"TuckerConfig.{targets[0]} chooses every layer's ranks; expected no per-layer ranks= "
                             f"with it (use exclude= to keep layers as they are), got ranks for {sorted(self.ranks)}")
        m = self.max_metric_drop
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0):
            raise ValueError(f"TuckerConfig.max_metric_drop: expected a number >= 0, got {m!r}")
        for name in ("only_if_cheaper", "validate", "fold_bn", "tune", "merge", "inductor", "keep_original_if_faster",
                     "speed_check", "data_aware"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TuckerConfig.{name}: expected True or False, got {getattr(self, name)!r}")
        if self.progress not in (True, False, None):
            raise ValueError(f"TuckerConfig.progress: expected True, False or None, got {self.progress!r}")

    @property
    def target(self) -> Optional[tuple[str, float]]:
        """``(name, ratio)`` of the ``target_*`` set, or ``None``."""
        for name in TARGETS:
            if getattr(self, name) is not None:
                return name, float(getattr(self, name))
        return None

    def replace(self, **changes: Any) -> "TuckerConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
