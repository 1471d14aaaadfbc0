"""Small dense linear algebra without thread oversubscription.

The factorisations here (``eigh`` of Gram matrices of at most a few thousand rows, ``svdvals`` and
``svd`` of unfoldings) are LAPACK calls whose multi-threaded paths gain little at these sizes and
lose badly when another process holds a core: measured on the 2-core CPU, ``eigh`` of a 512 x 512
float64 Gram took 0.5-5 s with 2 threads while other work ran, and 0.11-0.13 s with one thread.
So on the CPU each call runs with one intra-op thread, and the caller's setting is restored.

Example:
    >>> import torch
    >>> from tucker_fx.decomposition.linalg import eigh
    >>> g = torch.eye(3, dtype=torch.float64)
    >>> before = torch.get_num_threads()
    >>> eigh(g)[0].tolist(), torch.get_num_threads() == before
    ([1.0, 1.0, 1.0], True)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["single_threaded", "eigh", "eigvalsh", "svd", "svdvals"]


@contextlib.contextmanager
def single_threaded(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with one intra-op thread when ``device`` is the CPU; restore the setting after."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` (ascending eigenvalues, eigenvectors), single-threaded on the CPU."""
    with single_threaded(a.device):
        return torch.linalg.eigh(a)


def eigvalsh(a: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh`` (ascending), single-threaded on the CPU."""
    with single_threaded(a.device):
        return torch.linalg.eigvalsh(a)


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``, single-threaded on the CPU."""
    with single_threaded(a.device):
        return torch.linalg.svd(a, full_matrices=False)


def svdvals(a: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals``, single-threaded on the CPU."""
    with single_threaded(a.device):
        return torch.linalg.svdvals(a)
