"""Moved to :mod:`tucker_fx.apps.paper.probe`; this module stays so that old imports keep working."""

from tucker_fx.apps.paper.probe import *  # noqa: F401,F403
from tucker_fx.apps.paper.probe import __all__  # noqa: F401
