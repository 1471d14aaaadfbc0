"""Moved to :mod:`tucker_fx._internal.timing`; this module stays so that old imports keep working."""

from tucker_fx._internal.timing import *  # noqa: F401,F403
from tucker_fx._internal.timing import __all__  # noqa: F401
