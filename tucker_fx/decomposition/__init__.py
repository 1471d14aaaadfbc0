"""Pure tensor math of the decomposition: EVBMF rank selection, Tucker-2/Tucker-1, SVD.

Tensors in, tensors out -- no FX, no modules.
"""

from .evbmf import VBMFResult, evbmf, evbmf_from_singular_values
from .tucker import (
    SOLVERS,
    Tucker1,
    Tucker2,
    relative_error,
    truncated_svd,
    tucker1,
    tucker2,
    unfold,
    vbmf_ranks,
)

__all__ = [
    "SOLVERS",
    "Tucker1",
    "Tucker2",
    "VBMFResult",
    "evbmf",
    "evbmf_from_singular_values",
    "relative_error",
    "truncated_svd",
    "tucker1",
    "tucker2",
    "unfold",
    "vbmf_ranks",
]
