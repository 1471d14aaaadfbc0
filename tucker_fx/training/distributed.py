"""DistributedDataParallel plumbing for :func:`tucker_fx.finetune`: join the process group that
``torchrun`` describes (gloo on CPU, nccl on GPU), shard a loader, reduce numbers.

Under ``torchrun --nproc-per-node N script.py`` the script calls ``finetune`` as usual: it sees
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment, initialises the group, wraps the model
in DDP and shards the loader with a ``DistributedSampler``. Outside ``torchrun`` nothing changes.

Example:
    >>> from tucker_fx.training.distributed import world
    >>> world()   # (rank, world size) of a single process
    (0, 1)
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

__all__ = ["world", "env_rank", "env_world_size", "init_distributed", "shard_loader", "all_reduce_sum",
           "default_backend"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, or ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def env_rank() -> int:
    """This process's rank: the initialised group's, else ``RANK`` set by ``torchrun`` (0 when
    absent). Use it to let only rank 0 print and write files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK must be an integer, got {os.environ.get('RANK')!r}") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def default_backend(device: Optional[torch.device] = None) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_distributed(backend: Optional[str] = None, *, device: Optional[torch.device] = None,
                     timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group described by the ``torchrun`` environment (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) unless one is initialised already; returns
    ``(rank, world_size)``. ``timeout_s`` bounds every collective, so a lost peer fails the run
    instead of hanging it. A group this function creates is destroyed when the interpreter exits
    (a gloo group left alive could abort a rank at exit: "terminate called without an active
    exception", seen once in CI after a finished run)."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if dist.is_initialized():
        return world()
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise ValueError(f"init_distributed: expected the torchrun environment variables, missing {missing}; "
                         "run under torchrun or call torch.distributed.init_process_group yourself")
    dist.init_process_group(backend or default_backend(device), timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(_destroy_own_group)
    return world()


def _destroy_own_group() -> None:
    """At exit: destroy the process group :func:`init_distributed` made, if the script did not."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - a group already torn down by the launcher
            pass


def shard_loader(loader: DataLoader, rank: int, world_size: int, *, seed: int = 0) -> DataLoader:
    """The same loader with a ``DistributedSampler`` (shuffled iff the original shuffled), so each
    rank sees its own equal-sized share. A loader that already has one is returned as is."""
    if isinstance(loader.sampler, DistributedSampler) or world_size == 1:
        return loader
    if loader.batch_size is None:
        raise ValueError("shard_loader: expected a DataLoader built with batch_size (not a batch_sampler); "
                         "give it a DistributedSampler yourself")
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,  # type: ignore[arg-type]
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    workers: dict = {}
    if loader.num_workers > 0:  # these are only accepted with worker processes
        workers = dict(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                       multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      **workers)


def all_reduce_sum(values: list[float], device: Optional[torch.device] = None) -> list[float]:
    """Sum ``values`` over all ranks (identity in a single process)."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
