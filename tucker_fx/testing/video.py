"""Small video architectures that ``torch.fx.symbolic_trace`` cannot capture (they unpack
``x.shape`` and branch on sizes, as real video code does), for the ``torch.compile`` backend.

- :class:`VideoUNet`: a Stable-Video-Diffusion-style UNet on latents: ResNet blocks with a
  spatial Conv2d per frame and a temporal Conv3d (3,1,1) mix, a time embedding, spatio-temporal
  transformer blocks (spatial then temporal attention, Linear / 1x1 projections), down and up
  sampling with a skip connection.
- :class:`Swin3dSeg`: a Swin-style 3D segmentation net: patch embedding, window attention in
  3D windows (with a shifted-window block), and a conv decoder back to per-voxel logits.

Example:
    >>> import torch
    >>> from tucker_fx.testing.video import VIDEO_MODELS
    >>> factory, shape = VIDEO_MODELS["video_unet"]
    >>> factory()(torch.randn(shape)).shape
    torch.Size([1, 4, 4, 16, 16])
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_fx.testing.nets import seeded

__all__ = ["VideoUNet", "Swin3dSeg", "VIDEO_MODELS"]


def _timestep_features(dim: int, step: float = 500.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    angles = step * freqs
    return torch.cat([angles.sin(), angles.cos()])[None]


class SpatioTemporalResBlock(nn.Module):
    """GroupNorm-SiLU-Conv2d (per frame) + time embedding, twice, then a temporal Conv3d mix."""

    def __init__(self, cin: int, cout: int, temb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(4, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(4, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.temporal = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = self.conv1(F.silu(self.norm1(frames)))
        y = y + self.time(F.silu(temb)).repeat_interleave(t, dim=0)[:, :, None, None]
        y = self.conv2(F.silu(self.norm2(y)))
        y = y + self.skip(frames)
        y = y.reshape(b, t, -1, h, w).permute(0, 2, 1, 3, 4)
        return y + self.temporal(F.silu(y))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class SpatioTemporalTransformer(nn.Module):
    """proj_in (1x1 Conv2d) -> spatial attention -> temporal attention -> MLP -> proj_out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.ln1, self.spatial = nn.LayerNorm(channels), Attention(channels)
        self.ln2, self.temporal = nn.LayerNorm(channels), Attention(channels)
        self.ln3 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = self.proj_in(self.norm(frames))
        tokens = y.flatten(2).transpose(1, 2)  # (b t, h w, c)
        tokens = tokens + self.spatial(self.ln1(tokens))
        if t > 1:  # temporal attention only makes sense for clips
            seq = tokens.reshape(b, t, h * w, c).transpose(1, 2).reshape(b * h * w, t, c)
            seq = seq + self.temporal(self.ln2(seq))
            tokens = seq.reshape(b, h * w, t, c).transpose(1, 2).reshape(b * t, h * w, c)
        tokens = tokens + self.mlp(self.ln3(tokens))
        y = self.proj_out(tokens.transpose(1, 2).reshape(b * t, c, h, w)) + frames
        return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class VideoUNet(nn.Module):
    """Latent video UNet (B, 4, T, H, W) -> (B, 4, T, H, W), two resolutions."""

    def __init__(self, channels: int = 4, width: int = 32, temb: int = 32) -> None:
        super().__init__()
        self.register_buffer("t_features", _timestep_features(temb))
        self.time_mlp = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv3d(channels, width, (1, 3, 3), padding=(0, 1, 1))
        self.down1 = SpatioTemporalResBlock(width, width, temb)
        self.downsample = nn.Conv3d(width, 2 * width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.mid = SpatioTemporalResBlock(2 * width, 2 * width, temb)
        self.attn = SpatioTemporalTransformer(2 * width)
        self.upsample = nn.Conv3d(2 * width, width, (1, 3, 3), padding=(0, 1, 1))
        self.up1 = SpatioTemporalResBlock(2 * width, width, temb)
        self.norm_out = nn.GroupNorm(4, width)
        self.conv_out = nn.Conv3d(width, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(self.t_features).expand(x.shape[0], -1)
        h0 = self.down1(self.conv_in(x), temb)
        h = self.attn(self.mid(self.downsample(h0), temb))
        h = F.interpolate(h, scale_factor=(1, 2, 2), mode="nearest")
        h = self.up1(torch.cat([self.upsample(h), h0], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


class WindowBlock3d(nn.Module):
    """Swin block: LayerNorm -> attention inside (2, 4, 4) windows (optionally shifted) -> MLP."""

    def __init__(self, dim: int, window: tuple[int, int, int] = (2, 4, 4), shift: bool = False) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, D, H, W, C)
        b, d, h, w, c = x.shape
        wd, wh, ww = self.window
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-(wd // 2), -(wh // 2), -(ww // 2)), dims=(1, 2, 3))
        y = y.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        y = self.attn(y.reshape(-1, wd * wh * ww, c))
        y = y.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        y = y.reshape(b, d, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(wd // 2, wh // 2, ww // 2), dims=(1, 2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class Swin3dSeg(nn.Module):
    """(B, C, D, H, W) volume -> per-voxel logits, via Swin blocks and a conv decoder."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv3d(in_channels, dim, (2, 4, 4), stride=(2, 4, 4))
        self.blocks = nn.ModuleList([WindowBlock3d(dim), WindowBlock3d(dim, shift=True)])
        self.decode1 = nn.Conv3d(dim, dim, 3, padding=1)
        self.decode2 = nn.Conv3d(dim, 16, 3, padding=1)
        self.head = nn.Conv3d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        y = self.embed(x).permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            y = block(y)
        y = F.gelu(self.decode1(y.permute(0, 4, 1, 2, 3)))
        y = F.interpolate(y, size=tuple(size), mode="trilinear", align_corners=False)
        return self.head(F.gelu(self.decode2(y)))


VIDEO_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "video_unet": (seeded(VideoUNet), (1, 4, 4, 16, 16)),
    "swin3d_seg": (seeded(Swin3dSeg), (1, 1, 4, 16, 16)),
}
