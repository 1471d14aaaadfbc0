"""Moved to :mod:`tucker_fx.apps.paper.table2`; this module stays so that old imports keep working."""

from tucker_fx.apps.paper.table2 import *  # noqa: F401,F403
from tucker_fx.apps.paper.table2 import __all__  # noqa: F401
