"""tucker_fx: Tucker-decompose trained CNNs as a PyTorch FX / torch.compile graph pass.

Example:
    >>> import torch, tucker_fx
    >>> from tucker_fx.models import thetis_net, THETIS_INPUT_SHAPE
    >>> tucker_fx.analyze(thetis_net(), torch.empty(THETIS_INPUT_SHAPE)).total_params
    696428
"""

from tucker_fx.analysis import CostReport, NodeCost, analyze
from tucker_fx.errors import DecompositionError, ShapePropagationError, UntraceableModelError

__version__ = "0.1.0"

__all__ = [
    "analyze", "CostReport", "NodeCost", "UntraceableModelError", "ShapePropagationError",
    "DecompositionError", "__version__",
]
