"""Moved to :mod:`tucker_fx._internal.progress`; this module stays so that old imports keep working."""

from tucker_fx._internal.progress import *  # noqa: F401,F403
from tucker_fx._internal.progress import __all__  # noqa: F401
