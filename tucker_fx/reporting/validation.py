"""Moved to :mod:`tucker_fx.validation`; this module stays so that old imports keep working."""

from tucker_fx.validation import *  # noqa: F401,F403
from tucker_fx.validation import __all__  # noqa: F401
