"""Moved to :mod:`tucker_fx.testing.resnet3d`; this module stays so that old imports keep working."""

from tucker_fx.testing.resnet3d import *  # noqa: F401,F403
from tucker_fx.testing.resnet3d import __all__  # noqa: F401
