"""A synthetic stand-in for the paper's modified THETIS data set (forehand vs backhand).

Real THETIS cannot be downloaded here, so :class:`SyntheticThetis` renders comparable clips:
4 channels (RGB + depth), 28 frames centred on the moment of contact, 120 x 160 available
(80 x 128 by default, for speed), two classes. Every sample is a deterministic function of
``(seed, split, index)``. How a clip is made is documented in ``docs/training.md``.

The classes are defined relative to the player's handedness: a *forehand* is hit on the side
of the racket hand, swinging from that side across the body; a *backhand* is hit with the
racket arm across the body, swinging out towards the racket side. Mirroring a clip turns a
right-handed forehand into a left-handed forehand, so horizontal flips keep the label, and with
left- and right-handers mixed the direction of motion alone says nothing about the class.

Example:
    >>> from tucker_fx.apps.paper.data import SyntheticThetis, thetis_flat_features
    >>> ds = SyntheticThetis(4, resolution=(32, 40), frames=8)
    >>> video, label = ds[0]
    >>> tuple(video.shape), label, ds.classes[label]
    ((4, 8, 32, 40), 0, 'forehand')
    >>> thetis_flat_features(28, 120, 160)   # the paper's Linear(5184, 128)
    5184
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CLASSES", "THETIS_FRAMES", "FULL_RESOLUTION", "DEFAULT_RESOLUTION", "DEFAULT_SCALE_RANGE", "DEFAULT_OFFSET",
    "NORM_MEAN", "NORM_STD", "SwingParams",
    "SyntheticThetis",
    "render_swing", "sample_params", "thetis_flat_features", "thetis_net_for", "hflip",
]

CLASSES = ("forehand", "backhand")
THETIS_FRAMES = 28
FULL_RESOLUTION = (120, 160)
#: 80 x 128: the smallest 28-frame geometry at which the paper's ranks give >= 40x fewer weights
#: (x40.8: L1 is Linear(2688, 128)); a training step costs about half of one at 120 x 160
DEFAULT_RESOLUTION = (80, 128)
#: the subject's height as a fraction of the frame's, and its largest offset from the centre
#: (frame heights), by default: THETIS's videos are "fairly standardised"
DEFAULT_SCALE_RANGE, DEFAULT_OFFSET = (0.6, 0.8), 0.12
#: ``normalize=True`` returns ``(x - NORM_MEAN) / NORM_STD`` of the [0, 1] pixels: centred, unit-ish scale,
#: which the THETIS net (no normalisation layers) needs to start learning
NORM_MEAN, NORM_STD = 0.45, 0.25
_SPLITS = {"train": 0, "test": 1, "val": 2}


def thetis_flat_features(frames: int, height: int, width: int) -> int:
    """Input size of the THETIS net's first Linear for clips of ``frames x height x width``.

    Conv(5,11,11) 'same' -> MaxPool(2,4,4) -> Conv(3,5,5) valid -> MaxPool(2,4,4), 16 channels.

    Example:
        >>> thetis_flat_features(28, 96, 128)
        3360
    """
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"thetis_flat_features: {name} must be an int, got {type(v).__name__}")
    t, h, w = (frames // 2 - 2) // 2, (height // 4 - 4) // 4, (width // 4 - 4) // 4
    if min(t, h, w) < 1:
        raise ValueError(
            f"thetis_flat_features: expected frames >= 8, height >= 32 and width >= 32 (the two pools and "
            f"the valid 3x5x5 conv leave nothing otherwise), got {frames} x {height} x {width}"
        )
    return 16 * t * h * w


def thetis_net_for(frames: int = THETIS_FRAMES, height: int = DEFAULT_RESOLUTION[0],
                   width: int = DEFAULT_RESOLUTION[1], *, num_classes: int = 2, seed: Optional[int] = 0) -> torch.nn.Module:
    """The paper's THETIS net sized for clips of ``frames x height x width`` (seeded init, train mode).

    Example:
        >>> thetis_net_for(28, 96, 128).l1
        Linear(in_features=3360, out_features=128, bias=True)
    """
    from tucker_fx.apps.paper.model import ThetisNet

    flat = thetis_flat_features(frames, height, width)
    if seed is None:
        return ThetisNet(num_classes, flat_features=flat)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ThetisNet(num_classes, flat_features=flat)


def hflip(video: Tensor) -> Tensor:
    """Mirror a clip (``[..., H, W]``) left-right. The label stays: a mirrored right-handed
    forehand is a left-handed forehand.

    Example:
        >>> hflip(torch.arange(3.0).view(1, 1, 3)).tolist()
        [[[2.0, 1.0, 0.0]]]
    """
    return torch.flip(video, dims=(-1,))


Color = tuple[float, float, float]


@dataclass(frozen=True)
class SwingParams:
    """Everything that defines one clip except the sensor noise. Lengths are in units of the frame
    height (x from the left edge, y down from the top); depth runs from 0 (camera) to 1 (wall)."""

    label: int                      # 0 forehand, 1 backhand
    left_handed: bool
    two_handed: bool                # two-handed backhand (ignored for forehands)
    scale: float                    # player height / frame height
    center_x: float                 # the player's spine
    feet_y: float
    depth: float                    # the player's distance
    contact_frame: float            # the frame of contact (the clip is centred near it)
    backswing_frames: float         # frames from the start of the swing to contact
    follow_frames: float            # frames from contact to the end of the follow-through
    arm: float                      # arm reach, body units
    sweep: float                    # swing arc, degrees
    hand_height: float              # offset of the hand path, body units
    stance: float
    skin: Color
    shirt: Color
    shorts: Color
    racket: Color
    wall: Color
    floor: Color
    horizon: float                  # y of the wall/floor edge
    line_y: float                   # y of a white court line on the floor
    clutter: tuple[tuple[float, ...], ...]   # (x0, y0, x1, y1, depth, r, g, b) static boxes
    ball: Optional[tuple[float, float, float]]  # (x, y, depth) where the ball is at frame 0
    ball_exit: tuple[float, float]           # direction it leaves in after contact
    brightness: float
    cast: Color
    noise: float                    # RGB sensor noise sigma
    depth_noise: float
    holes: float                    # fraction of depth pixels with no reading

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]

    def mirrored(self, width_over_height: float) -> "SwingParams":
        """The same scene mirrored left-right in a frame ``width_over_height`` wide: the player's
        handedness flips, the class does not."""
        wh = width_over_height
        clutter = tuple((wh - c[2], c[1], wh - c[0], *c[3:]) for c in self.clutter)
        ball = None if self.ball is None else (wh - self.ball[0], self.ball[1], self.ball[2])
        return replace(self, left_handed=not self.left_handed, center_x=wh - self.center_x, clutter=clutter,
                       ball=ball, ball_exit=(-self.ball_exit[0], self.ball_exit[1]))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _color(rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> Color:
    return tuple(float(v) for v in rng.uniform(lo, hi, 3))  # type: ignore[return-value]


def _jitter(rng: np.random.Generator, color: Sequence[float], amount: float) -> Color:
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0.0, 1.0)) for c in color)  # type: ignore[return-value]


#: Three places to film in, like THETIS's arena and changing room: wall and floor colours, where the
#: floor starts, a court line, and static boxes (x0, y0, x1, y1, depth, r, g, b) laid out for 4:3.
_LOCATIONS: tuple[dict[str, Any], ...] = (
    dict(wall=(0.22, 0.25, 0.32), floor=(0.22, 0.45, 0.30), horizon=0.38, line_y=0.82,  # indoor arena
         clutter=((0.05, 0.08, 0.40, 0.26, 0.93, 0.70, 0.12, 0.12), (0.85, 0.10, 1.25, 0.26, 0.93, 0.90, 0.90, 0.85))),
    dict(wall=(0.62, 0.72, 0.84), floor=(0.24, 0.34, 0.62), horizon=0.30, line_y=0.88,  # outdoor hard court
         clutter=((0.55, 0.02, 0.80, 0.28, 0.94, 0.25, 0.45, 0.20), (0.0, 0.20, 0.25, 0.30, 0.93, 0.35, 0.35, 0.35))),
    dict(wall=(0.74, 0.67, 0.54), floor=(0.45, 0.40, 0.35), horizon=0.46, line_y=2.0,  # changing room
         clutter=((0.0, 0.05, 0.26, 0.46, 0.85, 0.40, 0.45, 0.52), (1.07, 0.05, 1.34, 0.46, 0.85, 0.40, 0.45, 0.52),
                  (0.30, 0.52, 0.70, 0.58, 0.80, 0.50, 0.34, 0.20))),
)


def _check_framing(scale_range: Any, offset: Any, where: str) -> None:
    if (not isinstance(scale_range, (tuple, list)) or len(scale_range) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale_range)
            or not 0.1 <= scale_range[0] <= scale_range[1] <= 1.0):
        raise ValueError(f"{where}: scale_range must be (low, high) with 0.1 <= low <= high <= 1, got {scale_range!r}")
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not 0.0 <= offset <= 1.0:
        raise ValueError(f"{where}: offset must be a number in [0, 1] (frame heights), got {offset!r}")


def sample_params(rng: np.random.Generator, label: int, *, frames: int = THETIS_FRAMES,
                  width_over_height: float = 4 / 3, left_handed: float = 0.2, two_handed: float = 0.5,
                  clutter: bool = True, noise: bool = True, scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE,
                  offset: float = DEFAULT_OFFSET) -> SwingParams:
    """Draw one scene of class ``label`` (0 forehand, 1 backhand). ``scale_range``: the player's
    height as a fraction of the frame's; ``offset``: the largest horizontal offset of the player
    from the frame's centre, in frame heights (wider ranges make a harder data set).

    Example:
        >>> p = sample_params(np.random.default_rng(0), 1)
        >>> p.class_name, 0.6 <= p.scale <= 0.8
        ('backhand', True)
    """
    if label not in (0, 1):
        raise ValueError(f"sample_params: label must be 0 (forehand) or 1 (backhand), got {label!r}")
    _check_framing(scale_range, offset, "sample_params")
    wh = width_over_height
    scale = _u(rng, *scale_range)
    margin = 0.42 * scale + 0.03
    center_x = float(np.clip(wh / 2 + _u(rng, -offset, offset), margin, max(margin, wh - margin)))  # roughly centred
    skin = tuple(float(v) for v in np.array([0.95, 0.75, 0.6]) * _u(rng, 0.35, 1.0))
    loc = _LOCATIONS[int(rng.integers(len(_LOCATIONS)))]
    stretch = wh / (4 / 3)  # the templates are laid out for a 4:3 frame
    shift = _u(rng, -0.05, 0.05)  # where the camera stood
    horizon = float(loc["horizon"]) + _u(rng, -0.03, 0.03)
    boxes = []
    if clutter:
        for x0, y0, x1, y1, z, *rgb in loc["clutter"]:  # type: ignore[attr-defined]
            dx, dy = _u(rng, -0.02, 0.02), _u(rng, -0.02, 0.02)
            boxes.append((x0 * stretch + shift + dx, y0 + dy, x1 * stretch + shift + dx, y1 + dy, z,
                          *_jitter(rng, rgb, 0.06)))
        for _ in range(int(rng.integers(0, 4))):  # bags, bottles, people far behind
            x0, y0 = _u(rng, 0.0, wh), _u(rng, horizon - 0.1, 0.9)
            boxes.append((x0, y0, x0 + _u(rng, 0.03, 0.12), y0 + _u(rng, 0.03, 0.15), _u(rng, 0.75, 0.93),
                          *_color(rng)))
    mid = frames / 2
    ball = None
    if rng.random() < 0.7:
        ball = (_u(rng, 0.0, wh), _u(rng, 0.05, 0.6), _u(rng, 0.15, 0.3))
    angle = _u(rng, -2.6, -0.5)
    return SwingParams(
        label=int(label), left_handed=bool(rng.random() < left_handed), two_handed=bool(rng.random() < two_handed),
        scale=scale, center_x=center_x, feet_y=_u(rng, 0.86, 0.98), depth=_u(rng, 0.4, 0.6),
        contact_frame=_u(rng, mid - 2.0, mid + 1.0), backswing_frames=_u(rng, 5.0, 16.0) * frames / 28,
        follow_frames=_u(rng, 5.0, 16.0) * frames / 28, arm=_u(rng, 0.32, 0.4), sweep=_u(rng, 210.0, 290.0),
        hand_height=_u(rng, -0.06, 0.06), stance=_u(rng, 0.07, 0.16), skin=skin,  # type: ignore[arg-type]
        shirt=_color(rng), shorts=_color(rng, 0.0, 0.8), racket=_color(rng, 0.2, 1.0),
        wall=_jitter(rng, loc["wall"], 0.06), floor=_jitter(rng, loc["floor"], 0.06), horizon=horizon,
        line_y=float(loc["line_y"]) + _u(rng, -0.03, 0.03), clutter=tuple(boxes), ball=ball,
        ball_exit=(math.cos(angle), math.sin(angle)),
        brightness=_u(rng, 0.7, 1.25) if noise else 1.0, cast=_color(rng, -0.06, 0.06) if noise else (0.0, 0.0, 0.0),
        noise=_u(rng, 0.01, 0.05) if noise else 0.0, depth_noise=_u(rng, 0.005, 0.03) if noise else 0.0,
        holes=_u(rng, 0.0, 0.03) if noise else 0.0,
    )


# ---- kinematics: body coordinates u (towards the racket side), v (up from the feet), w (towards
# the camera), all in player heights; one value per frame ------------------------------------------

def _interp(phi: Tensor, xs: Sequence[float], ys: Sequence[float]) -> Tensor:
    out = torch.full_like(phi, ys[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        f = ((phi - x0) / (x1 - x0)).clamp(0, 1)
        out = torch.where(phi >= x0, y0 + (y1 - y0) * f, out)
    return out


def _pose(p: SwingParams, frames: int) -> dict[str, Tensor]:
    """Per-frame 3D positions (u, v, w) of the joints and the racket, in body units."""
    t = torch.arange(frames, dtype=torch.float64)
    dt = t - p.contact_frame
    phi = torch.where(dt < 0, 0.5 + 0.5 * dt / p.backswing_frames, 0.5 + 0.5 * dt / p.follow_frames).clamp(0, 1)
    s = phi - 0.5
    if p.label == 0:  # forehand: from behind on the racket side, contact in front on that side, across the body
        alpha = torch.deg2rad(70.0 + p.sweep * s)
        hand_v = _interp(phi, [0, 0.5, 1], [0.70, 0.50, 0.86])
        tilt = _interp(phi, [0, 0.5, 1], [0.6, 0.0, 0.8])
        rot = torch.deg2rad(-100.0 * s)
    else:  # backhand: from behind on the other side, contact across the body, out to the racket side
        alpha = torch.deg2rad(110.0 - p.sweep * s)
        hand_v = _interp(phi, [0, 0.5, 1], [0.62, 0.50, 0.86])
        tilt = _interp(phi, [0, 0.5, 1], [0.4, 0.0, 0.8])
        rot = torch.deg2rad(-10.0 + 80.0 * s)
    hand = torch.stack([p.arm * torch.cos(alpha), hand_v + p.hand_height, p.arm * torch.sin(alpha)], -1)
    direction = torch.stack([torch.cos(alpha), tilt, torch.sin(alpha)], -1)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    shoulder = 0.11
    sh_r = torch.stack([shoulder * torch.cos(rot), torch.full_like(t, 0.74), -shoulder * torch.sin(rot)], -1)
    sh_o = torch.stack([-shoulder * torch.cos(rot), torch.full_like(t, 0.74), shoulder * torch.sin(rot)], -1)
    throat = hand + 0.07 * direction
    if p.label == 0:
        reach = torch.tensor([-0.30, 0.80, 0.18], dtype=torch.float64)  # pointing at the ball
        fold = torch.tensor([0.02, 0.62, 0.15], dtype=torch.float64)
        f = ((phi - 0.3) / 0.5).clamp(0, 1)[:, None]
        off = reach + (fold - reach) * f
    elif p.two_handed:
        off = throat
    else:
        back = torch.tensor([-0.34, 0.64, -0.12], dtype=torch.float64)
        f = ((phi - 0.3) / 0.3).clamp(0, 1)[:, None]
        off = throat + (back - throat) * f
    return {"hand": hand, "off_hand": off, "shoulder": sh_r, "off_shoulder": sh_o,
            "racket_a": hand + 0.15 * direction, "racket_b": hand + 0.32 * direction, "grip": hand + 0.12 * direction}


class _Canvas:
    """RGB + depth buffers of one clip and soft-edged capsules drawn into them with a z-buffer."""

    def __init__(self, p: SwingParams, frames: int, height: int, width: int) -> None:
        self.h = height
        self.ys = ((torch.arange(height, dtype=torch.float64) + 0.5) / height).view(1, height, 1)
        self.xs = ((torch.arange(width, dtype=torch.float64) + 0.5) / height).view(1, 1, width)
        ys2, xs2 = self.ys[0], self.xs[0]
        wall = torch.tensor(p.wall, dtype=torch.float64).view(3, 1, 1)
        floor = torch.tensor(p.floor, dtype=torch.float64).view(3, 1, 1)
        below = (ys2 > p.horizon).to(torch.float64)
        rgb = wall * (1 - below) + floor * below
        line = ((ys2 - p.line_y).abs() < 0.008).to(torch.float64)
        rgb = rgb * (1 - line) + 0.95 * line
        zfloor = 0.95 - 0.65 * ((ys2 - p.horizon) / (1.0 - p.horizon)).clamp(0, 1)
        depth = torch.where(ys2 > p.horizon, zfloor, torch.full_like(ys2, 0.95)).expand(height, width).clone()
        for x0, y0, x1, y1, z, r, g, b in p.clutter:
            m = ((xs2 >= x0) & (xs2 < x1) & (ys2 >= y0) & (ys2 < y1) & (depth > z)).to(torch.float64)
            rgb = rgb * (1 - m) + torch.tensor([r, g, b], dtype=torch.float64).view(3, 1, 1) * m
            depth = torch.where(m > 0, torch.full_like(depth, z), depth)
        self.rgb = rgb.to(torch.float32).unsqueeze(1).expand(3, frames, height, width).clone()
        self.depth = depth.to(torch.float32).unsqueeze(0).expand(frames, height, width).clone()

    def capsule(self, a: Tensor, b: Tensor, radius: float, color: Color) -> None:
        """A segment a -> b per frame (``[T, 3]`` as x, y, depth) with round ends. Only the box the
        segment sweeps over the clip (plus its radius and a pixel) is touched."""
        pad = radius + 1.5 / self.h
        ends = torch.cat([a, b])
        lo, hi = (ends[:, :2].min(0).values - pad) * self.h, (ends[:, :2].max(0).values + pad) * self.h
        j0, j1 = max(0, math.floor(lo[0].item())), min(self.xs.shape[-1], math.ceil(hi[0].item()))
        i0, i1 = max(0, math.floor(lo[1].item())), min(self.ys.shape[-2], math.ceil(hi[1].item()))
        if j0 >= j1 or i0 >= i1:
            return
        xs, ys = self.xs[..., j0:j1], self.ys[:, i0:i1]
        ax, ay, az = (a[:, i].view(-1, 1, 1) for i in range(3))
        bx, by, bz = (b[:, i].view(-1, 1, 1) for i in range(3))
        dx, dy = bx - ax, by - ay
        px, py = xs - ax, ys - ay
        h = ((px * dx + py * dy) / (dx * dx + dy * dy).clamp_min(1e-12)).clamp(0, 1)
        d = torch.sqrt((px - h * dx) ** 2 + (py - h * dy) ** 2)
        cover = ((radius - d) * self.h + 0.5).clamp(0, 1).float()
        bulge = torch.sqrt((1 - (d / radius) ** 2).clamp_min(0))
        z = (az + h * (bz - az) - 0.02 * radius * bulge).float()
        depth = self.depth[:, i0:i1, j0:j1]
        visible = cover * (z < depth)
        col = torch.tensor(color, dtype=torch.float32).view(3, 1, 1, 1) * (0.7 + 0.3 * bulge.float())
        rgb = self.rgb[:, :, i0:i1, j0:j1]
        rgb += visible * (col - rgb)
        self.depth[:, i0:i1, j0:j1] = torch.where(visible > 0.5, z, depth)


def render_swing(p: SwingParams, frames: int = THETIS_FRAMES, height: int = DEFAULT_RESOLUTION[0],
                 width: int = DEFAULT_RESOLUTION[1], *, generator: Optional[torch.Generator] = None) -> Tensor:
    """The clip of ``p`` as a float tensor ``[4, frames, height, width]`` in [0, 1] (RGB, then depth
    with near = bright and 0 = no reading). Sensor noise is drawn from ``generator`` when given.

    Example:
        >>> p = sample_params(np.random.default_rng(0), 0, noise=False)
        >>> clip = render_swing(p, 8, 32, 40)
        >>> bool(torch.allclose(render_swing(p.mirrored(40 / 32), 8, 32, 40), hflip(clip), atol=1e-6))
        True
    """
    side = 1.0 if p.left_handed else -1.0  # a right-hander facing the camera has the racket on the image's left
    pose = _pose(p, frames)

    def to_image(q: Tensor) -> Tensor:
        x = p.center_x + side * q[:, 0] * p.scale
        y = p.feet_y - p.scale * (q[:, 1] - 0.15 * q[:, 2])
        z = p.depth - 0.5 * p.scale * q[:, 2]
        return torch.stack([x, y, z], -1)

    def at(u: float, v: float, w: float = 0.0) -> Tensor:
        return to_image(torch.tensor([[u, v, w]], dtype=torch.float64).expand(frames, 3))

    c = _Canvas(p, frames, height, width)
    s = p.scale
    for sign in (-1.0, 1.0):
        c.capsule(at(0.06 * sign, 0.47), at((0.05 + p.stance) * sign, 0.02), 0.035 * s, p.shorts)
    c.capsule(at(0.0, 0.45), at(0.0, 0.52), 0.075 * s, p.shorts)
    c.capsule(at(0.0, 0.52), at(0.0, 0.72), 0.085 * s, p.shirt)
    c.capsule(at(0.0, 0.86), at(0.0, 0.87), 0.07 * s, p.skin)
    for shoulder, hand in (("shoulder", "hand"), ("off_shoulder", "off_hand")):  # sleeve, then forearm
        a, b = to_image(pose[shoulder]), to_image(pose[hand])
        elbow = (a + b) / 2
        c.capsule(a, elbow, 0.042 * s, p.shirt)
        c.capsule(elbow, b, 0.034 * s, p.skin)
    c.capsule(to_image(pose["hand"]), to_image(pose["grip"]), 0.014 * s, p.racket)
    c.capsule(to_image(pose["racket_a"]), to_image(pose["racket_b"]), 0.06 * s, p.racket)
    if p.ball is not None:
        t = torch.arange(frames, dtype=torch.float64)
        hit = to_image(pose["racket_b"] * 0.35 + pose["racket_a"] * 0.65)
        k = int(min(max(round(p.contact_frame), 0), frames - 1))
        contact = hit[k]
        start = torch.tensor(p.ball, dtype=torch.float64)
        f = (t / max(p.contact_frame, 1.0)).clamp(max=1.0)[:, None]
        before = start + (contact - start) * f
        speed = 0.6 * (contact[:2] - start[:2]).norm() / max(p.contact_frame, 1.0)
        after_xy = contact[:2] + speed * (t - p.contact_frame).clamp_min(0)[:, None] * torch.tensor(p.ball_exit,
                                                                                                      dtype=torch.float64)
        after = torch.cat([after_xy, (contact[2] - 0.01 * (t - p.contact_frame).clamp_min(0))[:, None]], -1)
        pos = torch.where((t < p.contact_frame)[:, None], before, after)
        pos = pos - torch.tensor([0.0, 0.0, 0.03], dtype=torch.float64)  # just in front of the racket
        c.capsule(pos, pos, 0.02 * s * p.depth / pos[:, 2:].clamp_min(0.05).mean().item(), (0.85, 0.95, 0.2))
    rgb = (c.rgb * p.brightness + torch.tensor(p.cast, dtype=torch.float32).view(3, 1, 1, 1))
    depth = (1.0 - c.depth).unsqueeze(0)
    if generator is not None:
        rgb = rgb + p.noise * torch.randn(rgb.shape, generator=generator)
        depth = depth + p.depth_noise * torch.randn(depth.shape, generator=generator)
        holes = torch.rand(depth.shape, generator=generator) < p.holes
        depth = depth.masked_fill(holes, 0.0)
    return torch.cat([rgb, depth]).clamp(0, 1)


class SyntheticThetis(Dataset):
    """Synthetic forehand/backhand clips like the paper's modified THETIS: ``(video, label)`` with
    ``video`` a float32 ``[4, frames, H, W]`` tensor (RGB + depth; pixels in [0, 1], standardised as
    ``(x - NORM_MEAN) / NORM_STD`` unless ``normalize=False``) and ``label`` 0 (forehand) or 1
    (backhand), alternating so that every prefix is balanced.

    ``size`` clips; sample ``i`` of a ``split`` is a deterministic function of ``(seed, split, i)``
    (the splits never share a clip). Clips are stored as 8-bit, like a camera's, and kept in memory
    after the first access when ``cache`` (about ``4 * frames * H * W`` bytes each).
    ``left_handed`` and ``two_handed`` are the fractions of left-handed players and of
    two-handed backhands; ``clutter=False`` / ``noise=False`` give clean scenes; ``scale_range``
    (player height / frame height) and ``offset`` (largest distance of the player from the frame's
    centre, in frame heights) set the framing: wider ranges make a harder data set. ``transform``
    (a callable on the video tensor) is applied on every access, e.g. :func:`hflip`.

    Example:
        >>> ds = SyntheticThetis(2, resolution=(32, 40), frames=8, split="test")
        >>> len(ds), ds.input_shape, ds.targets
        (2, (1, 4, 8, 32, 40), [0, 1])
    """

    classes = CLASSES

    def __init__(self, size: int = 256, *, resolution: tuple[int, int] = DEFAULT_RESOLUTION,
                 frames: int = THETIS_FRAMES, seed: int = 0, split: str = "train", left_handed: float = 0.2,
                 two_handed: float = 0.5, clutter: bool = True, noise: bool = True, normalize: bool = True,
                 cache: bool = True, transform: Optional[Callable[[Tensor], Tensor]] = None,
                 scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE, offset: float = DEFAULT_OFFSET) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"SyntheticThetis: size must be an int >= 1, got {size!r}")
        if (not isinstance(resolution, (tuple, list)) or len(resolution) != 2
                or not all(isinstance(v, int) and v >= 1 for v in resolution)):
            raise ValueError(f"SyntheticThetis: resolution must be (height, width) ints, got {resolution!r}")
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"SyntheticThetis: frames must be an int >= 2, got {frames!r}")
        if split not in _SPLITS:
            raise ValueError(f"SyntheticThetis: split must be one of {tuple(_SPLITS)}, got {split!r}")
        for name, v in (("left_handed", left_handed), ("two_handed", two_handed)):
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"SyntheticThetis: {name} must be a fraction in [0, 1], got {v!r}")
        _check_framing(scale_range, offset, "SyntheticThetis")
        if transform is not None and not callable(transform):
            raise TypeError(f"SyntheticThetis: transform must be callable, got {type(transform).__name__}")
        self.size, self.resolution, self.frames = size, (int(resolution[0]), int(resolution[1])), frames
        self.seed, self.split = int(seed), split
        self.left_handed, self.two_handed = float(left_handed), float(two_handed)
        self.clutter, self.noise, self.normalize = clutter, noise, normalize
        self.cache, self.transform = cache, transform
        self.scale_range, self.offset = (float(scale_range[0]), float(scale_range[1])), float(offset)
        self._store: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.size

    @property
    def input_shape(self) -> tuple[int, int, int, int, int]:
        """``(1, 4, frames, H, W)``: the example-input shape for ``tucker_fx.compress``."""
        return (1, 4, self.frames, *self.resolution)

    @property
    def targets(self) -> list[int]:
        return [i % 2 for i in range(self.size)]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, _SPLITS[self.split], index]))

    def _index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"SyntheticThetis: index must be an int, got {type(index).__name__}")
        if not -self.size <= index < self.size:
            raise IndexError(f"SyntheticThetis: index {index} out of range for {self.size} clips")
        return int(index) % self.size

    def params(self, index: int) -> SwingParams:
        """The scene of clip ``index`` (player, swing, background, noise levels)."""
        i = self._index(index)
        h, w = self.resolution
        return sample_params(self._rng(i), i % 2, frames=self.frames, width_over_height=w / h,
                             left_handed=self.left_handed, two_handed=self.two_handed,
                             clutter=self.clutter, noise=self.noise, scale_range=self.scale_range,
                             offset=self.offset)

    def _render8(self, i: int) -> Tensor:
        p = self.params(i)
        gen = None
        if self.noise:
            state = np.random.SeedSequence([self.seed, _SPLITS[self.split], i, 1]).generate_state(1, np.uint64)[0]
            gen = torch.Generator().manual_seed(int(state >> np.uint64(1)))
        # many small tensor ops: one thread is faster, and much faster on a busy machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            clip = render_swing(p, self.frames, *self.resolution, generator=gen)
        finally:
            torch.set_num_threads(threads)
        return (clip * 255).round().to(torch.uint8)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = self._index(index)
        clip8 = self._store.get(i)
        if clip8 is None:
            clip8 = self._render8(i)
            if self.cache:
                self._store[i] = clip8
        video = clip8.to(torch.float32) / 255.0
        if self.normalize:
            video = (video - NORM_MEAN) / NORM_STD
        if self.transform is not None:
            video = self.transform(video)
        return video, i % 2

    def __repr__(self) -> str:
        h, w = self.resolution
        return (f"SyntheticThetis(size={self.size}, split={self.split!r}, seed={self.seed}, frames={self.frames}, "
                f"resolution=({h}, {w}), left_handed={self.left_handed}, two_handed={self.two_handed}, "
                f"scale_range={self.scale_range}, offset={self.offset})")

    def extra(self) -> dict[str, Any]:
        """The settings as plain data (for reports)."""
        return {"size": self.size, "split": self.split, "seed": self.seed, "frames": self.frames,
                "resolution": list(self.resolution), "left_handed": self.left_handed,
                "two_handed": self.two_handed, "clutter": self.clutter, "noise": self.noise,
                "normalize": self.normalize, "scale_range": list(self.scale_range), "offset": self.offset}
