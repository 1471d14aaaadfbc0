"""A 3D ResNet-18 (basic blocks, 64-512 channels, ~33M parameters), input 1 x 3 x 16 x 112 x 112.

Example:
    >>> from tucker_fx.testing.resnet3d import resnet3d18
    >>> sum(p.numel() for p in resnet3d18().parameters()) > 33_000_000
    True
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RESNET3D_INPUT_SHAPE", "BasicBlock3d", "ResNet3d", "resnet3d18"]

RESNET3D_INPUT_SHAPE = (1, 3, 16, 112, 112)


class BasicBlock3d(nn.Module):
    """Two 3x3x3 convs with BatchNorm and an identity (or 1x1x1 strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet3d(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 400) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )
        widths = (64, 128, 256, 512)
        cin = 64
        stages = []
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = [BasicBlock3d(cin, w, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock3d(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet3d18(num_classes: int = 400, *, seed: int | None = 0) -> ResNet3d:
    """3D ResNet-18 with seeded random weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return ResNet3d((2, 2, 2, 2), num_classes).eval()
