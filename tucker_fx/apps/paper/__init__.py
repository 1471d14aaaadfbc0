"""The paper reproduction: the THETIS net and its Table 2 ranks, synthetic THETIS data, a linear probe.

Table 2 (:mod:`~tucker_fx.apps.paper.table2`) and the training demo
(:mod:`~tucker_fx.apps.paper.train_demo`) are imported on their own; they load the training loops.

Example:
    >>> import torch
    >>> from tucker_fx.apps.paper import THETIS_INPUT_SHAPE, thetis_net
    >>> thetis_net()(torch.zeros(THETIS_INPUT_SHAPE)).shape
    torch.Size([1, 2])
"""

from tucker_fx.apps.paper.data import (
    CLASSES, DEFAULT_OFFSET, DEFAULT_RESOLUTION, DEFAULT_SCALE_RANGE, FULL_RESOLUTION, NORM_MEAN, NORM_STD,
    THETIS_FRAMES, SwingParams, SyntheticThetis, hflip, render_swing, sample_params, thetis_flat_features,
    thetis_net_for,
)
from tucker_fx.apps.paper.model import THETIS_INPUT_SHAPE, THETIS_LAYERS, ThetisNet, thetis_net, thetis_paper_config
from tucker_fx.apps.paper.probe import ProbeResult, linear_probe, probe_features

__all__ = [
    "THETIS_INPUT_SHAPE", "THETIS_LAYERS", "ThetisNet", "thetis_net", "thetis_paper_config",
    "CLASSES", "DEFAULT_RESOLUTION", "DEFAULT_SCALE_RANGE", "DEFAULT_OFFSET", "FULL_RESOLUTION", "NORM_MEAN",
    "NORM_STD", "THETIS_FRAMES", "SwingParams", "SyntheticThetis",
    "hflip", "render_swing", "sample_params", "thetis_flat_features", "thetis_net_for",
    "ProbeResult", "linear_probe", "probe_features",
]
