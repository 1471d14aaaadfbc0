"""Small architectures that exercise the analysis and the rewrite: 1D/2D/3D convs, a
residual block, functional convs on ``get_attr`` weights, a shared weight, a depthwise conv.

Each entry of :data:`TEST_MODELS` maps a name to ``(factory, input_shape)``.

Example:
    >>> import torch
    >>> from tucker_fx.testing.nets import TEST_MODELS
    >>> factory, shape = TEST_MODELS["residual3d"]
    >>> factory()(torch.randn(shape)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Conv1dNet", "Conv2dNet", "Residual3dNet", "FunctionalConvNet", "SharedWeightNet",
    "DepthwiseNet", "TEST_MODELS", "seeded",
]


class Conv1dNet(nn.Module):
    """Audio-style 1D net: strided, dilated and 'same'-padded Conv1d, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 16, 7, stride=2, padding=3)
        self.conv2 = nn.Conv1d(16, 24, 5, padding="same", dilation=2, bias=False)
        self.conv3 = nn.Conv1d(24, 32, 3, padding_mode="reflect", padding=1)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean(dim=-1))


class Conv2dNet(nn.Module):
    """Image-style 2D net with BatchNorm, anisotropic kernels/strides and a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, (3, 5), stride=(1, 2), padding=(1, 2)),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding="same", padding_mode="replicate"),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, dilation=2, padding=2, bias=False),
            nn.ReLU(),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 8 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.flatten(self.features(x)))))


class Residual3dNet(nn.Module):
    """A 3D residual block (conv-bn-relu-conv-bn + 1x1x1 shortcut) and a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 16, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2))
        self.conv1 = nn.Conv3d(16, 32, 3, stride=(2, 1, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(32)
        self.conv2 = nn.Conv3d(32, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(32)
        self.shortcut = nn.Conv3d(16, 32, 1, stride=(2, 1, 1), bias=False)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = F.relu(y + self.shortcut(x))
        return self.fc(torch.flatten(self.pool(y), 1))


class FunctionalConvNet(nn.Module):
    """Functional ``F.conv2d``/``F.linear`` on plain Parameters (``get_attr`` in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(12, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.randn(12) * 0.1)
        self.w2 = nn.Parameter(torch.randn(16, 12, 3, 3) * 0.1)
        self.wl = nn.Parameter(torch.randn(10, 16) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, self.b1, stride=2, padding=1))
        x = F.relu(torch.conv2d(x, self.w2, None, 1, "same"))
        x = x.mean(dim=(2, 3))
        return F.linear(x, self.wl)


class SharedWeightNet(nn.Module):
    """One Conv2d applied twice (its weights count once) and a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(8, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Parameter(torch.randn(8, 4) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = self.shared(torch.relu(self.shared(x)))
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        return torch.matmul(x, self.proj)


class DepthwiseNet(nn.Module):
    """MobileNet-style separable conv: depthwise 3x3 (groups = channels) then pointwise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(32, 24, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = F.relu(self.dw(x))
        x = F.relu(self.grouped(x))
        return self.pw(x)


def seeded(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    """A factory building ``cls()`` with seed 0, in eval mode (the user's RNG state is kept)."""
    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls().eval()

    make.__name__ = cls.__name__
    return make


TEST_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (seeded(Conv1dNet), (2, 3, 64)),
    "conv2d": (seeded(Conv2dNet), (2, 3, 16, 16)),
    "residual3d": (seeded(Residual3dNet), (2, 3, 8, 16, 16)),
    "functional": (seeded(FunctionalConvNet), (2, 3, 16, 16)),
    "shared": (seeded(SharedWeightNet), (2, 8, 8, 8)),
    "depthwise": (seeded(DepthwiseNet), (2, 3, 12, 12)),
}
