"""The ``torch.compile`` backend (``backend="tucker"``)."""

from tucker_fx.backend.dynamo import (BACKEND_OPTIONS, DEFAULT_MAX_VARIANTS, concrete_inputs, lift_parameters,
                                      tucker_backend)

__all__ = ["tucker_backend", "lift_parameters", "concrete_inputs", "BACKEND_OPTIONS", "DEFAULT_MAX_VARIANTS"]
