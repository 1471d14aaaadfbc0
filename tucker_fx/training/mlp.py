"""Moved to :mod:`tucker_fx.apps.mlp.model`; this module stays so that old imports keep working."""

from tucker_fx.apps.mlp.model import *  # noqa: F401,F403
from tucker_fx.apps.mlp.model import __all__  # noqa: F401
