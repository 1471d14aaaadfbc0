"""Moved to :mod:`tucker_fx.apps.paper.train_demo`; this module stays so that old imports keep working."""

from tucker_fx.apps.paper.train_demo import *  # noqa: F401,F403
from tucker_fx.apps.paper.train_demo import __all__  # noqa: F401
