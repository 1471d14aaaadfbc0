"""Data for training and fine-tuning: a synthetic THETIS stand-in, a linear probe, sklearn digits.

Moved: the code lives in :mod:`tucker_fx.apps.paper` (THETIS, probe) and :mod:`tucker_fx.apps.mlp`
(digits); this package stays so that old imports keep working.

Example:
    >>> from tucker_fx.data import SyntheticThetis, CLASSES
    >>> ds = SyntheticThetis(2, resolution=(32, 40), frames=8)
    >>> [CLASSES[y] for _, y in ds]
    ['forehand', 'backhand']
"""

from tucker_fx.apps.mlp.digits import digits_datasets, have_sklearn
from tucker_fx.apps.paper.data import (
    CLASSES, DEFAULT_OFFSET, DEFAULT_RESOLUTION, DEFAULT_SCALE_RANGE, FULL_RESOLUTION, NORM_MEAN, NORM_STD,
    THETIS_FRAMES, SwingParams, SyntheticThetis, hflip, render_swing, sample_params, thetis_flat_features,
    thetis_net_for,
)
from tucker_fx.apps.paper.probe import ProbeResult, linear_probe, probe_features

__all__ = [
    "CLASSES", "DEFAULT_RESOLUTION", "DEFAULT_SCALE_RANGE", "DEFAULT_OFFSET", "FULL_RESOLUTION", "NORM_MEAN",
    "NORM_STD", "THETIS_FRAMES", "SwingParams", "SyntheticThetis",
    "hflip", "render_swing", "sample_params", "thetis_flat_features", "thetis_net_for",
    "ProbeResult", "linear_probe", "probe_features", "digits_datasets", "have_sklearn",
]
