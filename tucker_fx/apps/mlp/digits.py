"""scikit-learn's 8 x 8 handwritten digits (shipped with the package, no download) as torch
data sets, for the MLP example. Needs the ``mlp`` extra: ``pip install -e ".[mlp]"``.

Example:
    >>> from tucker_fx.apps.mlp.digits import digits_datasets, have_sklearn
    >>> if have_sklearn():
    ...     train, test = digits_datasets()
    ...     print(len(train) + len(test), tuple(train[0][0].shape))
    ... else:
    ...     print(1797, (64,))
    1797 (64,)
"""

from __future__ import annotations

import importlib.util

import torch
from torch.utils.data import TensorDataset

__all__ = ["digits_datasets", "have_sklearn"]


def have_sklearn() -> bool:
    """Whether scikit-learn is installed (the ``mlp`` extra)."""
    return importlib.util.find_spec("sklearn") is not None


def digits_datasets(test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` TensorDatasets of ``(x [64] float32 in [0, 1], label)``, a stratified
    split of the 1,797 digits (``test_fraction`` of each class held out, chosen by ``seed``)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits_datasets: test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("digits_datasets needs scikit-learn: pip install -e \".[mlp]\" "
                          "(or pip install scikit-learn)") from exc
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_idx.append(idx[: max(1, round(test_fraction * len(idx)))])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    return TensorDataset(x[~is_test], y[~is_test]), TensorDataset(x[is_test], y[is_test])
