"""Moved to :mod:`tucker_fx.apps.bench`; this module stays so that old imports keep working."""

from tucker_fx.apps.bench import *  # noqa: F401,F403
from tucker_fx.apps.bench import __all__  # noqa: F401
