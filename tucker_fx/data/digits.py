"""Moved to :mod:`tucker_fx.apps.mlp.digits`; this module stays so that old imports keep working."""

from tucker_fx.apps.mlp.digits import *  # noqa: F401,F403
from tucker_fx.apps.mlp.digits import __all__  # noqa: F401
