"""Moved to :mod:`tucker_fx.testing.nets`; this module stays so that old imports keep working."""

from tucker_fx.testing.nets import *  # noqa: F401,F403
from tucker_fx.testing.nets import __all__  # noqa: F401
