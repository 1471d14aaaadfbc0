"""Moved to :mod:`tucker_fx.testing.video`; this module stays so that old imports keep working."""

from tucker_fx.testing.video import *  # noqa: F401,F403
from tucker_fx.testing.video import __all__  # noqa: F401
