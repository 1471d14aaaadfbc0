"""A 1x1 conv and the GroupNorm/InstanceNorm of its output, as one product on the narrow input.

After a Tucker decomposition, a conv followed by a norm (``conv -> norm -> act``, the unit of most
3-D U-Nets) becomes ``first -> core -> last -> norm``: ``last`` maps the core's R channels to the
layer's C (R = C/4 at rank 0.25), and the norm then reads, reduces and rewrites the full-width map,
work that the decomposition does not cut. But the norm's statistics of ``y = U z + b`` follow from
those of ``z``, which has only R channels: with ``m`` the mean of ``z`` over the positions and ``S``
its covariance (R x R),

    mean(y_c) = u_c . m + b_c,    var(y_c) = u_c^T S u_c

(a group's statistics pool those of its channels), and the normalised map is again a 1x1 conv of
the centred ``z``, with the rows of ``U`` scaled by ``gamma_c / sqrt(var + eps)``. So the norm costs
a pass over R channels (mean, centring, an R x R Gram matrix) instead of three over C, and the
full-width map is written once, already normalised. Exact up to rounding (the variance comes from
the centred core output, no cancellation); differentiable (plain ops), so fine-tuning trains the
same parameters.

Measured on this project's 2-core CPU (one thread), 1 x 8 -> 32 channels at 64^3, the product and
an InstanceNorm: see ``docs/benchmarks.md`` ("The zoo, fourth pass").

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.kernels.pointwise import PointwiseConv
    >>> from tucker_fx.kernels.norm_fold import NormedPointwise
    >>> conv, norm = nn.Conv3d(4, 16, 1), nn.GroupNorm(4, 16)
    >>> z = torch.randn(2, 4, 5, 6, 7)
    >>> fused = NormedPointwise(PointwiseConv.from_conv(conv), norm)
    >>> bool(torch.allclose(fused(z), norm(conv(z)), atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tucker_fx.kernels.pointwise import PointwiseConv
from tucker_fx.kernels.workspace import pooled as _pooled, workspace_out

__all__ = ["NormedPointwise", "foldable_norm", "normed_affine"]

_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def foldable_norm(norm: nn.Module) -> Optional[int]:
    """The number of groups of a norm that normalises by its input's own statistics over channel
    groups and positions (GroupNorm; InstanceNorm without running statistics: one channel a group);
    None for any other module."""
    if isinstance(norm, nn.GroupNorm):
        return int(norm.num_groups)
    if isinstance(norm, _INSTANCE) and not norm.track_running_stats:
        return int(norm.num_features)
    from tucker_fx.kernels.inplace import InplaceInstanceNorm
    if isinstance(norm, InplaceInstanceNorm):
        return int(norm.num_features)
    return None


def _columns(z: Tensor) -> Tensor:
    """``z`` (N, R, *spatial) as (N, R, positions): a view, also of a channels-last batch-1 map."""
    n, r = z.shape[:2]
    if n == 1 and z.dim() > 2 and not z.is_contiguous() and z.permute(0, *range(2, z.dim()), 1).is_contiguous():
        return z.permute(0, *range(2, z.dim()), 1).reshape(1, -1, r).transpose(1, 2)  # channels-last: a view
    return z.reshape(n, r, -1)


def normed_affine(cols: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
                  beta: Optional[Tensor], groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The normalised 1x1 conv as ``w (z - m) + shift``: ``(w (N, C, R), shift (N, C), m (N, R), z - m)``
    for the columns ``cols`` (N, R, positions) of the narrow input (see the module docstring)."""
    n, r, positions = cols.shape
    c = weight.shape[0]
    u = weight.reshape(c, r)
    m = cols.mean(2)                                                      # (n, R)
    centred = cols - m.unsqueeze(2)                                       # (n, R, P)
    cov = torch.bmm(centred, centred.transpose(1, 2)) / positions        # (n, R, R)
    var = ((u @ cov) * u).sum(2)                                          # (n, C): u_c^T S u_c
    mean = m @ u.t()                                                      # (n, C), without the bias
    if bias is not None:
        mean = mean + bias
    grouped = mean.reshape(n, groups, c // groups)
    group_mean = grouped.mean(2, keepdim=True)
    # a group's variance: the mean of its channels' second moments about the group mean
    group_var = (var.reshape(n, groups, -1) + (grouped - group_mean) ** 2).mean(2, keepdim=True)
    scale = torch.rsqrt(group_var + eps).expand(n, groups, c // groups).reshape(n, c)
    shift = (grouped - group_mean).reshape(n, c) * scale                  # (y_c - mean_g) at z = m
    if gamma is not None:
        scale, shift = scale * gamma, shift * gamma
    if beta is not None:
        shift = shift + beta
    return scale.unsqueeze(2) * u, shift, m, centred


@torch.fx.wrap
def _normed_pointwise(z: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
                      beta: Optional[Tensor], groups: int, eps: float, out: Optional[Tensor] = None) -> Tensor:
    n, spatial = z.shape[0], z.shape[2:]
    c = weight.shape[0]
    w, shift, _, centred = normed_affine(_columns(z), weight, bias, gamma, beta, groups, eps)
    if n == 1 and out is not None:  # a reused buffer (kernels.workspace)
        torch.addmm(shift.reshape(c, 1), w[0], centred[0], out=out.view(c, -1))
        return out.view(1, c, *spatial)
    if n == 1 and not torch.compiler.is_compiling():
        y = torch.addmm(shift.reshape(c, 1), w[0], centred[0])
    else:
        y = torch.baddbmm(shift.unsqueeze(2), w, centred)
    return y.reshape(n, c, *spatial)


class NormedPointwise(nn.Module):
    """``norm(pointwise(z))`` for a stride-1 :class:`PointwiseConv` and a GroupNorm or InstanceNorm
    without running statistics (see the module docstring); the parameters of both, under the names
    ``weight``/``bias`` (the conv's) and ``norm_weight``/``norm_bias``."""

    def __init__(self, pointwise: PointwiseConv, norm: nn.Module) -> None:
        super().__init__()
        groups = foldable_norm(norm)
        if groups is None:
            raise ValueError(f"NormedPointwise: expected a GroupNorm or an InstanceNorm without running statistics, "
                             f"got {type(norm).__name__}")
        if not isinstance(pointwise, PointwiseConv) or any(s != 1 for s in pointwise.stride):
            raise ValueError(f"NormedPointwise: expected a stride-1 PointwiseConv, got {pointwise}")
        c = pointwise.weight.shape[0]
        if c % groups:
            raise ValueError(f"NormedPointwise: {c} output channels do not split into {groups} groups")
        features = getattr(norm, "num_channels", None) or getattr(norm, "num_features", None)
        if features != c:
            raise ValueError(f"NormedPointwise: the norm expects {features} channels, the conv makes {c}")
        self.weight = pointwise.weight
        self.bias = pointwise.bias
        self.norm_weight = norm.weight
        self.norm_bias = norm.bias
        self.groups = groups
        self.eps = float(norm.eps)

    def forward(self, z: Tensor) -> Tensor:
        out = None
        if _pooled(self):
            shape = (int(z.shape[0]), int(self.weight.shape[0])) + tuple(int(d) for d in z.shape[2:])
            out = workspace_out(self, shape, z, self.weight, self.bias, self.norm_weight, self.norm_bias)
        return _normed_pointwise(z, self.weight, self.bias, self.norm_weight, self.norm_bias, self.groups, self.eps,
                                 out)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, bias={self.bias is not None}, "
                f"norm groups={self.groups}, eps={self.eps}, affine={self.norm_weight is not None}")
