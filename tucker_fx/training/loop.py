"""Plain PyTorch loops: ``finetune`` a (compressed) model, ``evaluate`` its accuracy.

``finetune`` trains the model it is given, in place (a compressed ``result.module`` is an
``fx.GraphModule`` and trains like any module). With ``teacher=`` it distils from the original
model (Hinton et al.'s soft targets), which recovers accuracy after compression faster than the
labels alone. Under ``torchrun`` it runs DistributedDataParallel (see
:mod:`tucker_fx.training.distributed`).

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from tucker_fx.training import evaluate, finetune
    >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    >>> model = nn.Linear(4, 2)
    >>> history = finetune(model, loader, epochs=20, lr=0.1, quiet=True, seed=0)
    >>> history.losses[-1] < history.losses[0], evaluate(model, loader).accuracy > 0.9
    (True, True)
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from tucker_fx.training.distributed import all_reduce_sum, env_world_size, init_distributed, shard_loader, world

__all__ = ["finetune", "evaluate", "EvalResult", "TrainHistory", "EarlyStopping", "distillation_loss"]

OptimizerSpec = Union[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]]


@dataclass
class TrainHistory:
    """What :func:`finetune` did: mean training loss per epoch (over all ranks), steps, time."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    """Accuracy over a loader, per class too. ``per_class[c]`` is NaN for a class with no samples."""

    accuracy: float
    per_class: tuple[float, ...]
    counts: tuple[int, ...]
    correct: int
    total: int
    loss: float
    class_names: Optional[tuple[str, ...]] = None
    #: samples a ``DistributedSampler`` repeated to even out the ranks, left out of every count
    duplicates_skipped: int = 0

    def name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and c < len(self.class_names) else str(c)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_class"] = [None if math.isnan(a) else a for a in self.per_class]
        return d

    def __str__(self) -> str:
        parts = ", ".join(f"{self.name(c)} {a:.1%}" for c, a in enumerate(self.per_class) if not math.isnan(a))
        return f"accuracy {self.accuracy:.1%} ({self.correct}/{self.total}); per class: {parts}"


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _split_batch(batch: Any, where: str) -> tuple[Any, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], torch.as_tensor(batch[1])
    raise TypeError(f"{where}: expected batches of (inputs, targets), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _call(model: nn.Module, x: Any) -> Tensor:
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


class _Modes:
    """Put every submodule in eval (or train) mode and restore each one's own flag afterwards."""

    def __init__(self, model: nn.Module, training: bool) -> None:
        self.model, self.training = model, training

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag


def evaluate(model: nn.Module, loader: Iterable, *, num_classes: Optional[int] = None,
             class_names: Optional[Sequence[str]] = None) -> EvalResult:
    """Top-1 accuracy, per-class accuracy and mean cross-entropy of ``model`` over ``loader``
    (batches of ``(inputs, targets)``; inputs go to the model's device). The model runs in eval
    mode under ``torch.no_grad`` and is left exactly as it was (modes restored, nothing moved).

    With a ``DistributedSampler`` (``loader.sampler``), the samples it repeats to give every rank
    the same number (``drop_last=False``) are left out of the counts (``duplicates_skipped``), and
    under an initialised process group the counts are summed over the ranks, so ``total`` is the
    data set's size. (``drop_last=True`` drops the tail instead: ``total`` is then smaller.)

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad(): _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
        >>> r = evaluate(net, [(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 1, 1]))],
        ...              class_names=("cat", "dog"))
        >>> r.accuracy, r.per_class, str(r)
        (0.6666666666666666, (1.0, 0.5), 'accuracy 66.7% (2/3); per class: cat 100.0%, dog 50.0%')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"evaluate expects a torch.nn.Module, got {type(model).__name__}")
    device = _device_of(model)
    hits: dict[int, int] = {}
    counts: dict[int, int] = {}
    loss_sum, n, n_logits = 0.0, 0, 0
    sampler = getattr(loader, "sampler", None)
    real = _real_samples(sampler) if isinstance(sampler, DistributedSampler) else None
    seen, skipped = 0, 0
    with _Modes(model, training=False), torch.no_grad():
        for batch in loader:
            x, y = _split_batch(batch, "evaluate")
            x, y = _to(x, device), y.to(device)
            out = _call(model, x)
            if out.dim() != 2 or out.shape[0] != y.shape[0]:
                raise ValueError(f"evaluate: expected logits of shape (batch, classes) = ({y.shape[0]}, C), "
                                 f"got {tuple(out.shape)}")
            if real is not None:  # the sampler's padding comes last on each rank
                keep = max(0, min(int(y.shape[0]), real - seen))
                seen += int(y.shape[0])
                skipped += int(y.shape[0]) - keep
                out, y = out[:keep], y[:keep]
                if keep == 0:
                    continue
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
            pred, n_logits = out.argmax(1), max(n_logits, int(out.shape[1]))
            for c in range(out.shape[1]):
                sel = y == c
                counts[c] = counts.get(c, 0) + int(sel.sum())
                hits[c] = hits.get(c, 0) + int((pred[sel] == c).sum())
            n += int(y.shape[0])
    # the logits fix the class count, so every rank reduces vectors of the same length
    k = max(num_classes or 0, len(class_names or ()), n_logits)
    vec = ([float(counts.get(c, 0)) for c in range(k)] + [float(hits.get(c, 0)) for c in range(k)]
           + [loss_sum, float(n), float(skipped)])
    if isinstance(sampler, DistributedSampler) and world()[1] > 1:
        vec = all_reduce_sum(vec, device if device.type == "cuda" else None)
    cnt, hit = [int(v) for v in vec[:k]], [int(v) for v in vec[k:2 * k]]
    loss_sum, n, skipped = vec[-3], int(vec[-2]), int(vec[-1])
    if n == 0:
        raise ValueError("evaluate: the loader gave no samples")
    per_class = tuple(h / c if c else float("nan") for h, c in zip(hit, cnt))
    return EvalResult(sum(hit) / n, per_class, tuple(cnt), sum(hit), n, loss_sum / n,
                      tuple(class_names) if class_names is not None else None, skipped)


def _real_samples(sampler: DistributedSampler) -> Optional[int]:
    """How many of this rank's samples are distinct: the sampler lays the (shuffled) indices out,
    pads them with repeats to a multiple of the ranks and deals position ``rank + j * ranks`` to
    this rank; positions past the data set's length are the repeats. None when nothing is padded."""
    if getattr(sampler, "drop_last", False):
        return None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    return len(range(int(sampler.rank), size, int(sampler.num_replicas)))


class EarlyStopping:
    """A :func:`finetune` ``callback`` that selects the model on a validation set: after every epoch
    it evaluates ``model`` on ``val_loader``, keeps a copy of the best weights (highest accuracy,
    then lowest loss), and stops training once the accuracy has not risen for ``patience`` epochs
    (``None``: never stops early) -- but not before the best accuracy reaches ``min_accuracy``
    (when given), so that a slow start at chance level does not end the run. :meth:`restore`
    loads the best weights back. ``history`` holds one dict per epoch: ``epoch``, ``train_loss``,
    ``val_accuracy``, ``val_loss``.

    Keep the test split out of it: selecting on the data you report on overstates the accuracy.
    Under DDP, give every rank the same (unsharded) ``val_loader``: the decisions then agree.

    Example:
        >>> import torch, torch.nn as nn
        >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long(); data = [(x, y)]
        >>> net = nn.Linear(4, 2)
        >>> stop = EarlyStopping(net, data, patience=2)
        >>> _ = finetune(net, data, epochs=30, lr=0.1, quiet=True, seed=0, callback=stop)
        >>> net = stop.restore(); stop.best.accuracy == max(h["val_accuracy"] for h in stop.history)
        True
    """

    def __init__(self, model: nn.Module, val_loader: Iterable, *, patience: Optional[int] = None,
                 min_accuracy: Optional[float] = None, class_names: Optional[Sequence[str]] = None,
                 on_epoch: Optional[Callable[[dict[str, float]], None]] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EarlyStopping expects a torch.nn.Module, got {type(model).__name__}")
        if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 1):
            raise ValueError(f"EarlyStopping: patience must be an int >= 1 or None, got {patience!r}")
        if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
            raise ValueError(f"EarlyStopping: min_accuracy must be an accuracy in [0, 1] or None, got {min_accuracy!r}")
        self.model, self.val_loader, self.patience, self.min_accuracy = model, val_loader, patience, min_accuracy
        self.class_names, self.on_epoch = class_names, on_epoch
        self.history: list[dict[str, float]] = []
        self.best: Optional[EvalResult] = None
        self.best_epoch = 0
        self.stopped_early = False
        self._rose = 0
        self._state: Optional[dict[str, Tensor]] = None

    def __call__(self, epoch: int, history: TrainHistory) -> bool:
        r = evaluate(self.model, self.val_loader, class_names=self.class_names)
        row = {"epoch": epoch, "train_loss": history.losses[-1], "val_accuracy": r.accuracy, "val_loss": r.loss}
        self.history.append(row)
        if self.on_epoch is not None:
            self.on_epoch(row)
        if self.best is None or r.accuracy > self.best.accuracy:
            self._rose = epoch  # patience counts from the last epoch the accuracy rose
        if self.best is None or (r.accuracy, -r.loss) > (self.best.accuracy, -self.best.loss):
            self.best, self.best_epoch = r, epoch
            self._state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.stopped_early = (self.patience is not None and epoch - self._rose >= self.patience
                              and (self.min_accuracy is None or self.best.accuracy >= self.min_accuracy))
        return self.stopped_early

    def restore(self) -> nn.Module:
        """Load the best weights seen into ``model`` (after at least one epoch) and return it."""
        if self._state is None:
            raise ValueError("EarlyStopping.restore: no epoch has been evaluated yet (pass it as finetune's callback)")
        self.model.load_state_dict(self._state)
        return self.model


def distillation_loss(student: Tensor, teacher: Tensor, targets: Tensor, *, weight: float = 0.5,
                      temperature: float = 4.0) -> Tensor:
    """``(1 - weight) * CE(student, targets) + weight * T^2 * KL(teacher_T || student_T)``, with
    ``*_T`` the softmax at temperature ``T`` (Hinton et al. 2015).

    Example:
        >>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[2.0, 0.0]])
        >>> round(distillation_loss(s, t, torch.tensor([0]), weight=1.0).item(), 6)
        0.0
    """
    ce = F.cross_entropy(student, targets)
    if weight == 0.0:
        return ce
    kl = F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                  reduction="batchmean", log_target=True)
    return (1.0 - weight) * ce + weight * temperature ** 2 * kl


def _optimizer(spec: OptimizerSpec, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if callable(spec):
        opt = spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"finetune: optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt
    if spec == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if spec == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if spec == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"finetune: optimizer must be 'adam', 'adamw', 'sgd' or a callable params -> Optimizer, got {spec!r}")


class _Bar:
    """A one-line progress bar on stderr; on a non-terminal stream, one line per epoch."""

    def __init__(self, enabled: bool, stream: Optional[TextIO], label: str) -> None:
        self.enabled, self.label = enabled, label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, epoch: int, epochs: int, i: int, n: Optional[int], loss: float, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and (not self.tty or now - self.last < 0.1):
            return
        self.last = now
        if n:
            done = int(20 * i / n)
            bar = f"[{'#' * done}{'-' * (20 - done)}] {i}/{n}"
        else:
            bar = f"{i} steps"
        line = f"{self.label} epoch {epoch}/{epochs} {bar} loss {loss:.4f} {now - self.start:.1f}s"
        if self.tty:
            print("\r" + line, end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


def finetune(model: nn.Module, train_loader: Iterable, *, epochs: int = 1, lr: float = 1e-3,
             teacher: Optional[nn.Module] = None, distill_weight: float = 0.5, temperature: float = 4.0,
             optimizer: OptimizerSpec = "adam", weight_decay: float = 0.0, schedule: str = "constant",
             loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, max_steps: Optional[int] = None,
             grad_clip: Optional[float] = None, device: Optional[Union[str, torch.device]] = None,
             distributed: Optional[bool] = None, seed: Optional[int] = None, quiet: bool = False,
             stream: Optional[TextIO] = None, label: str = "finetune",
             callback: Optional[Callable[[int, TrainHistory], Optional[bool]]] = None) -> TrainHistory:
    """Train ``model`` in place on ``train_loader`` (batches of ``(inputs, targets)``) and return
    the loss history. Plain loop: forward, loss, backward, optimizer step.

    - ``teacher``: a model (the uncompressed original) to distil from: the loss becomes
      :func:`distillation_loss` with ``distill_weight`` and ``temperature``. The teacher runs in
      eval mode under ``no_grad`` and is not changed.
    - ``optimizer``: ``"adam"``, ``"adamw"``, ``"sgd"`` (momentum 0.9) or ``params -> Optimizer``;
      ``schedule``: ``"constant"`` or ``"cosine"`` (to 0 over the run); ``max_steps`` stops early.
    - ``device``: where to train (the model is moved there; default: where it is).
    - ``distributed``: ``None`` (default) runs DistributedDataParallel when a process group is
      initialised or ``torchrun`` set ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on GPU; the loader is
      sharded with a ``DistributedSampler``; progress only on rank 0); ``False`` never does, and
      then makes no collective call even inside an initialised process group.
    - ``quiet``: no progress bar (otherwise one line per epoch on stderr, a live bar on a terminal).
    - ``callback(epoch, history)``: called after each epoch (1-based); returning True stops training.
      :class:`EarlyStopping` is one: model selection and early stopping on a validation set.

    The model's train/eval modes are restored at the end. A model compressed with the default
    ``TuckerConfig(lowering="auto")`` may hold FFT-lowered layers (``TuckerFFTConv``): they train
    (autograd goes through the FFT), but their parameters are the lowered ones; to fine-tune the
    plain blocks, compress with ``TuckerConfig(lowering="none")`` and lower the fine-tuned model
    afterwards with ``tucker_fx.lower(model, x)``. Example: see the module docstring.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"finetune expects a torch.nn.Module, got {type(model).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"finetune: teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"finetune: epochs must be an int >= 1, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"finetune: lr must be a positive number, got {lr!r}")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"finetune: distill_weight must be in [0, 1], got {distill_weight!r}")
    if temperature <= 0:
        raise ValueError(f"finetune: temperature must be > 0, got {temperature!r}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"finetune: schedule must be 'constant' or 'cosine', got {schedule!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"finetune: max_steps must be >= 1 or None, got {max_steps!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no parameters that require grad")

    dev = torch.device(device) if device is not None else _device_of(model)
    use_ddp = distributed if distributed is not None else (world()[1] > 1 or env_world_size() > 1)
    rank, world_size = 0, 1
    if use_ddp:
        if env_world_size() > 1 and dev.type == "cuda" and device is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        rank, world_size = init_distributed(device=dev)
    if seed is not None:
        torch.manual_seed(seed)
    model.to(dev)
    if teacher is not None and _device_of(teacher) != dev:
        teacher = copy.deepcopy(teacher).to(dev)
    loader = train_loader
    if world_size > 1 and isinstance(train_loader, DataLoader):
        loader = shard_loader(train_loader, rank, world_size, seed=seed or 0)
    net: nn.Module = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = _optimizer(optimizer, params, float(lr), weight_decay)
    try:
        per_epoch: Optional[int] = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    bounds = [v for v in (max_steps, per_epoch * epochs if per_epoch else None) if v]
    total = min(bounds) if bounds else None
    sched = None
    if schedule == "cosine":
        if total is None:
            raise ValueError("finetune: schedule='cosine' needs a loader with a length or max_steps")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    bar = _Bar(not quiet and rank == 0, stream, label)
    history = TrainHistory(world_size=world_size)
    start = time.perf_counter()
    with _Modes(model, training=True):
        if teacher is not None:
            teacher_modes = _Modes(teacher, training=False)
            teacher_modes.__enter__()
        try:
            for epoch in range(1, epochs + 1):
                if isinstance(getattr(loader, "sampler", None), DistributedSampler):
                    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
                loss_sum, count, i = 0.0, 0, 0
                for batch in loader:
                    if max_steps is not None and history.steps >= max_steps:
                        break
                    x, y = _split_batch(batch, "finetune")
                    x, y = _to(x, dev), y.to(dev)
                    out = _call(net, x)
                    if teacher is not None:
                        with torch.no_grad():
                            t_out = _call(teacher, x)
                        loss = distillation_loss(out, t_out, y, weight=distill_weight, temperature=temperature)
                    else:
                        loss = (loss_fn or F.cross_entropy)(out, y)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"finetune: the loss became {loss.item()} at step {history.steps} "
                                                 f"(epoch {epoch}); lower lr (got {lr})")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                    if sched is not None:
                        sched.step()
                    n = int(y.shape[0])
                    loss_sum, count, i = loss_sum + loss.item() * n, count + n, i + 1
                    history.steps += 1
                    bar.update(epoch, epochs, i, per_epoch, loss_sum / count)
                count_f = float(count)
                if world_size > 1:  # only a DDP run reduces: distributed=False never touches the group
                    loss_sum, count_f = all_reduce_sum([loss_sum, count_f], dev if dev.type == "cuda" else None)
                history.samples += int(count_f)
                history.losses.append(loss_sum / max(count_f, 1.0))
                bar.update(epoch, epochs, i, per_epoch, history.losses[-1], final=True)
                if callback is not None and callback(epoch, history):
                    break
                if max_steps is not None and history.steps >= max_steps:
                    break
        finally:
            if teacher is not None:
                teacher_modes.__exit__(None, None, None)
    history.seconds = time.perf_counter() - start
    return history
