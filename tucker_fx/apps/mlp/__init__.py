"""The MLP example (docs/mlp_example.md): a Linear-only net and sklearn's digits.

Example:
    >>> from tucker_fx.apps.mlp import mlp
    >>> [m.out_features for m in mlp([8, 4, 2]) if hasattr(m, "out_features")]
    [4, 2]
"""

from tucker_fx.apps.mlp.digits import digits_datasets, have_sklearn
from tucker_fx.apps.mlp.model import MLP, mlp

__all__ = ["MLP", "mlp", "digits_datasets", "have_sklearn"]
