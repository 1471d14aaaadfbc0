"""Fine-tuning and evaluation: plain PyTorch loops, DistributedDataParallel under torchrun.

Example:
    >>> import torch
    >>> from tucker_fx.training import evaluate, mlp
    >>> r = evaluate(mlp([4, 3]), [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))], num_classes=3)
    >>> r.total, len(r.per_class)
    (8, 3)
"""

from tucker_fx.training.loop import EarlyStopping, EvalResult, TrainHistory, distillation_loss, evaluate, finetune
# the MLP lives in tucker_fx.apps.mlp; imported through the old submodule so that the function ``mlp``,
# bound after it, is what ``tucker_fx.training.mlp`` names (not the submodule)
from tucker_fx.training.mlp import MLP, mlp

__all__ = ["finetune", "evaluate", "EarlyStopping", "EvalResult", "TrainHistory", "distillation_loss", "MLP", "mlp"]
