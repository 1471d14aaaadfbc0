"""Moved to :mod:`tucker_fx.apps.paper.data`; this module stays so that old imports keep working."""

from tucker_fx.apps.paper.data import *  # noqa: F401,F403
from tucker_fx.apps.paper.data import __all__  # noqa: F401
from tucker_fx.apps.paper.data import _pose  # noqa: F401  (tests/test_data.py imports it)
