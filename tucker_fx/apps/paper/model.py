"""The paper's network for THETIS (RGB + depth, 28 frames, 120 x 160), rebuilt from Table 2's weight counts.

Example:
    >>> import torch
    >>> from tucker_fx.apps.paper.model import thetis_net, THETIS_INPUT_SHAPE
    >>> thetis_net()(torch.zeros(THETIS_INPUT_SHAPE)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tucker_fx.config import TuckerConfig

__all__ = ["THETIS_INPUT_SHAPE", "ThetisNet", "thetis_net", "THETIS_LAYERS", "thetis_paper_config"]

THETIS_INPUT_SHAPE = (1, 4, 28, 120, 160)

#: the paper's layer names (Table 2) -> module qualified names in :class:`ThetisNet`
THETIS_LAYERS = {"C1": "c1", "C2": "c2", "L1": "l1", "L2": "l2", "L3": "l3"}


class ThetisNet(nn.Module):
    """Conv3d(4,6,(5,11,11),pad (2,5,5)) -> ReLU -> MaxPool(2,4,4) -> Conv3d(6,16,(3,5,5)) ->
    ReLU -> MaxPool(2,4,4) -> Flatten -> Linear(5184,128) -> ReLU -> Linear(128,84) -> ReLU ->
    Linear(84,2)."""

    def __init__(self, num_classes: int = 2, in_channels: int = 4, flat_features: int = 5184) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(in_channels, 6, (5, 11, 11), padding=(2, 5, 5))
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool3d((2, 4, 4))
        self.c2 = nn.Conv3d(6, 16, (3, 5, 5))
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool3d((2, 4, 4))
        self.flatten = nn.Flatten()
        self.l1 = nn.Linear(flat_features, 128)
        self.relu3 = nn.ReLU()
        self.l2 = nn.Linear(128, 84)
        self.relu4 = nn.ReLU()
        self.l3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.c1(x)))
        x = self.pool2(self.relu2(self.c2(x)))
        x = self.relu3(self.l1(self.flatten(x)))
        x = self.relu4(self.l2(x))
        return self.l3(x)


def thetis_net(num_classes: int = 2, *, seed: int | None = 0) -> ThetisNet:
    """The paper's THETIS network with (seeded) random weights, in eval mode."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ThetisNet(num_classes).eval()
    return ThetisNet(num_classes).eval()


def thetis_paper_config(**overrides: object) -> TuckerConfig:
    """The paper's Table 2 ranks: C1 Tucker-2 (2,2), C2 Tucker-2 (2,3), L1 Tucker-2 (4,7) as a
    conv, L2 Tucker-1 (1), L3 untouched. Extra keyword arguments set other config fields."""
    ranks = {"c1": (2, 2), "c2": (2, 3), "l1": (4, 7), "l2": 1, "l3": None}
    return TuckerConfig(ranks=ranks, **overrides)  # type: ignore[arg-type]
