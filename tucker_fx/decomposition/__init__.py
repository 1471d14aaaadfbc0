"""Pure tensor math of the decomposition: EVBMF rank selection, Tucker-2/Tucker-1, SVD, and the
factor algebra that merges linear maps (:mod:`.algebra`), and data-aware factors fitted to a layer's
input/output statistics (:mod:`.data_aware`).

Tensors in, tensors out -- no FX, no modules.
"""

from .data_aware import (
    ChannelStats,
    data_aware_svd,
    data_aware_tucker1,
    data_aware_tucker2,
    response_error,
    whitening,
)
from .algebra import absorb_into_conv, as_matrix, compose_linear, fold_into_flat_linear
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
    "ChannelStats",
    "data_aware_svd",
    "data_aware_tucker1",
    "data_aware_tucker2",
    "response_error",
    "whitening",
    "SOLVERS",
    "Tucker1",
    "Tucker2",
    "VBMFResult",
    "absorb_into_conv",
    "as_matrix",
    "compose_linear",
    "evbmf",
    "evbmf_from_singular_values",
    "fold_into_flat_linear",
    "relative_error",
    "truncated_svd",
    "tucker1",
    "tucker2",
    "unfold",
    "vbmf_ranks",
]
