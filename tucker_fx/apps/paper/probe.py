"""A linear probe: how far logistic regression on pixels gets on a data set.

It tells whether a data set needs a network at all. By default the pixels are average-pooled
per channel to 7 x 12 x 16 first (5,376 features for RGB-D clips), not used raw: a raw 80 x 128
clip has 1.1 million. On :class:`~tucker_fx.apps.paper.data.SyntheticThetis` at its defaults the probe is
*well above* chance (about 84% test accuracy: mostly right-handed, roughly centred players, for
whom where the racket is gives the class away); the harder settings score lower. The measured
numbers are in ``docs/training.md``.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from tucker_fx.apps.paper.probe import linear_probe
    >>> x = torch.randn(64, 1, 4, 4); y = (x[:, 0, 0, 0] > 0).long()
    >>> r = linear_probe(TensorDataset(x, y), TensorDataset(x, y), pool=None)
    >>> r.train_accuracy > 0.9
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["ProbeResult", "linear_probe", "probe_features"]


@dataclass
class ProbeResult:
    """Accuracies of a logistic-regression probe, the feature count and the settings used."""

    train_accuracy: float
    test_accuracy: float
    features: int
    pool: Optional[tuple[int, ...]]
    weight_decay: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = "raw pixels" if self.pool is None else f"pixels average-pooled to {'x'.join(map(str, self.pool))}"
        return (f"linear probe on {where} ({self.features:,} features, weight decay {self.weight_decay:g}): "
                f"train {self.train_accuracy:.1%}, test {self.test_accuracy:.1%}")


def probe_features(dataset: Dataset, pool: Optional[Sequence[int]] = None, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """``(features [N, F], labels [N])``: each sample average-pooled to ``pool`` (per channel;
    ``None`` keeps every pixel), flattened.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> x, y = probe_features(TensorDataset(torch.ones(3, 2, 8, 8), torch.zeros(3)), pool=(2, 2))
        >>> tuple(x.shape), tuple(y.shape)
        ((3, 8), (3,))
    """
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if pool is not None:
            if len(pool) != x.dim() - 2:
                raise ValueError(f"probe_features: pool needs one size per spatial dim of the samples "
                                 f"({x.dim() - 2} for samples of shape {tuple(x.shape[1:])}), got {tuple(pool)}")
            x = F.adaptive_avg_pool3d(x, tuple(pool)) if x.dim() == 5 else (
                F.adaptive_avg_pool2d(x, tuple(pool)) if x.dim() == 4 else F.adaptive_avg_pool1d(x, tuple(pool)))
        feats.append(x.flatten(1).to(torch.float32))
        labels.append(torch.as_tensor(y).long())
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train: Dataset, test: Dataset, *, pool: Optional[Sequence[int]] = (7, 12, 16),
                 weight_decay: float = 1e-3, steps: int = 100, seed: int = 0) -> ProbeResult:
    """Fit multinomial logistic regression (L-BFGS, L2 ``weight_decay``, standardised features)
    on ``train`` and score it on ``test``. ``pool``: the size each channel is average-pooled to
    before fitting (``None``: raw pixels; mind the memory).
    """
    if weight_decay < 0:
        raise ValueError(f"linear_probe: weight_decay must be >= 0, got {weight_decay}")
    if steps < 1:
        raise ValueError(f"linear_probe: steps must be >= 1, got {steps}")
    xtr, ytr = probe_features(train, pool)
    xte, yte = probe_features(test, pool)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    classes = int(max(ytr.max().item(), yte.max().item())) + 1
    gen = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(xtr.shape[1], classes, generator=gen)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc_tr = ((xtr @ w + b).argmax(1) == ytr).float().mean().item()
        acc_te = ((xte @ w + b).argmax(1) == yte).float().mean().item()
    return ProbeResult(acc_tr, acc_te, int(xtr.shape[1]), None if pool is None else tuple(int(p) for p in pool),
                       float(weight_decay))
