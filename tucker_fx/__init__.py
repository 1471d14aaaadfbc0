"""tucker_fx: Tucker-decompose trained CNNs as a PyTorch FX / torch.compile graph pass.

Example:
    >>> import torch, tucker_fx
    >>> from tucker_fx.models import thetis_net, thetis_paper_config, THETIS_INPUT_SHAPE
    >>> x = torch.randn(THETIS_INPUT_SHAPE)
    >>> tucker_fx.analyze(thetis_net(), x).total_params
    696428
    >>> result = tucker_fx.compress(thetis_net(), x, config=thetis_paper_config())
    >>> result.after.total_params, result.after.total_flops
    (13598, 2635140440)
"""

import importlib
from typing import Any

from tucker_fx.analysis import CostReport, NodeCost, analyze
from tucker_fx.api import CompressionResult, apply_plan, compress, lower
from tucker_fx.config import TuckerConfig
from tucker_fx.decomposition import VBMFResult, evbmf
from tucker_fx.errors import (CaptureWarning, DecompositionError, PlanEditedWarning, PoorCompressionWarning,
                              ShapePropagationError, SlowerThanOriginalWarning, TuckerWarning,
                              UntraceableModelError)
from tucker_fx.io import load, save
from tucker_fx.planning import LayerPlan, Plan
from tucker_fx.validation import ValidationReport, validate

__version__ = "0.1.0"

__all__ = [
    "analyze", "compress", "apply_plan", "lower", "validate", "save", "load", "evbmf", "TuckerConfig", "Plan",
    "LayerPlan",
    "CompressionResult", "CostReport", "NodeCost", "ValidationReport", "VBMFResult",
    "UntraceableModelError", "ShapePropagationError", "DecompositionError", "TuckerWarning", "CaptureWarning",
    "PoorCompressionWarning", "PlanEditedWarning", "SlowerThanOriginalWarning", "__version__",
    "finetune", "evaluate",
]

#: names loaded on first use: the training loops are an application (they import torch.distributed)
_LAZY = {"finetune": "tucker_fx.training", "evaluate": "tucker_fx.training"}


def __getattr__(name: str) -> Any:
    """``finetune`` and ``evaluate``, imported from :mod:`tucker_fx.training` on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tucker_fx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
