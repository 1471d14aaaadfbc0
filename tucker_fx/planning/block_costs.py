"""What a decomposed layer costs, from the layer's geometry (Table 1 of the paper).

The formulas compose the registry's own :func:`conv_macs` / :func:`linear_macs`, so a
decomposed block is counted exactly as the analysis will count the rewritten graph.

Example:
    >>> from tucker_fx.planning.block_costs import tucker2_conv_cost
    >>> tucker2_conv_cost(in_shape=(1, 4, 28, 120, 160), out_shape=(1, 6, 28, 120, 160),
    ...                   kernel=(5, 11, 11), ranks=(2, 2), bias=True)
    (1311744000, 2446)
"""

from __future__ import annotations

import math

from tucker_fx.analysis.cost_registry import conv_macs, linear_macs

__all__ = ["tucker2_conv_cost", "tucker1_conv_cost", "svd_linear_cost", "tucker2_linear_cost",
           "tucker2_linear_as_conv_cost"]

Shape = tuple[int, ...]


def _with_channels(shape: Shape, channels: int) -> Shape:
    return (shape[0], channels, *shape[2:])


def tucker2_conv_cost(in_shape: Shape, out_shape: Shape, kernel: Shape, ranks: tuple[int, int],
                      bias: bool) -> tuple[int, int]:
    """(MACs, params) of 1x1 S->R_s, core R_s->R_t, 1x1 R_t->T (+bias)."""
    s, t = in_shape[1], out_shape[1]
    rs, rt = ranks
    d = len(kernel)
    macs = (
        conv_macs(_with_channels(in_shape, rs), (rs, s) + (1,) * d)
        + conv_macs(_with_channels(out_shape, rt), (rt, rs, *kernel))
        + conv_macs(out_shape, (t, rt) + (1,) * d)
    )
    params = s * rs + rt * rs * math.prod(kernel) + t * rt + (t if bias else 0)
    return macs, params


def tucker1_conv_cost(in_shape: Shape, out_shape: Shape, kernel: Shape, rank: int,
                      bias: bool) -> tuple[int, int]:
    """(MACs, params) of core S->R then 1x1 R->T (+bias)."""
    s, t = in_shape[1], out_shape[1]
    d = len(kernel)
    macs = conv_macs(_with_channels(out_shape, rank), (rank, s, *kernel)) + conv_macs(
        out_shape, (t, rank) + (1,) * d
    )
    return macs, rank * s * math.prod(kernel) + t * rank + (t if bias else 0)


def svd_linear_cost(in_shape: Shape, out_features: int, rank: int, bias: bool) -> tuple[int, int]:
    """(MACs, params) of Linear S->R then Linear R->T (+bias)."""
    s = in_shape[-1]
    rows = (*in_shape[:-1], rank)
    macs = linear_macs(in_shape, rank) + linear_macs(rows, out_features)
    return macs, s * rank + rank * out_features + (out_features if bias else 0)


def tucker2_linear_cost(in_shape: Shape, out_features: int, ranks: tuple[int, int],
                        bias: bool) -> tuple[int, int]:
    """(MACs, params) of Linear S->R_s, R_s->R_t, R_t->T (+bias)."""
    s = in_shape[-1]
    rs, rt = ranks
    lead = in_shape[:-1]
    macs = linear_macs(in_shape, rs) + linear_macs((*lead, rs), rt) + linear_macs((*lead, rt), out_features)
    return macs, s * rs + rs * rt + rt * out_features + (out_features if bias else 0)


def tucker2_linear_as_conv_cost(feature_shape: Shape, out_features: int, ranks: tuple[int, int],
                                bias: bool) -> tuple[int, int]:
    """(MACs, params) of the paper's L1: a Linear on flatten(B, S, *sp) decomposed as a conv.

    1x1 channel mix S->R_s at every position, Linear R_s*prod(sp)->R_t, Linear R_t->T (+bias).
    ``feature_shape`` is (B, S, *sp).
    """
    b, s, *sp = feature_shape
    rs, rt = ranks
    positions = math.prod(sp)
    macs = (
        conv_macs((b, rs, *sp), (rs, s) + (1,) * len(sp))
        + linear_macs((b, rs * positions), rt)
        + linear_macs((b, rt), out_features)
    )
    params = s * rs + rs * positions * rt + rt * out_features + (out_features if bias else 0)
    return macs, params
