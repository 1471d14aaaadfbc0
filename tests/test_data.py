"""The synthetic THETIS stand-in: geometry, determinism, the class definition, mirroring, the probe."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tucker_fx.data import (
    CLASSES, NORM_MEAN, NORM_STD, SyntheticThetis, hflip, linear_probe, render_swing, sample_params,
    thetis_flat_features, thetis_net_for,
)
from tucker_fx.data.thetis import _pose
from tucker_fx.models import ThetisNet

SMALL = dict(resolution=(32, 40), frames=8)


@pytest.mark.parametrize("thw", [(8, 32, 40), (12, 48, 64), (28, 36, 33)])
def test_flat_features_fit_the_net(thw):
    net = thetis_net_for(*thw)
    assert net(torch.zeros(1, 4, *thw)).shape == (1, 2)
    assert net.l1.in_features == thetis_flat_features(*thw)


def test_flat_features_of_the_paper():
    assert thetis_flat_features(28, 120, 160) == 5184 == ThetisNet().l1.in_features


@pytest.mark.parametrize("thw", [(7, 120, 160), (28, 31, 160), (28, 120, 20)])
def test_flat_features_too_small(thw):
    with pytest.raises(ValueError, match="expected frames >= 8"):
        thetis_flat_features(*thw)


def test_samples_shape_range_labels():
    ds, raw = SyntheticThetis(6, **SMALL), SyntheticThetis(6, **SMALL, normalize=False)
    assert len(ds) == 6 and ds.targets == [0, 1, 0, 1, 0, 1]
    for i, (video, label) in enumerate(raw):
        assert video.shape == (4, 8, 32, 40) and video.dtype == torch.float32
        assert 0.0 <= video.min() and video.max() <= 1.0
        assert label == i % 2 and ds.params(i).class_name == CLASSES[label]
        torch.testing.assert_close(ds[i][0], (video - NORM_MEAN) / NORM_STD)


def test_deterministic_and_splits_differ():
    a, b = SyntheticThetis(3, **SMALL, seed=5), SyntheticThetis(3, **SMALL, seed=5, cache=False)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(3))
    assert torch.equal(a[1][0], a[1][0])  # cached and re-read
    other_seed, other_split = SyntheticThetis(3, **SMALL, seed=6), SyntheticThetis(3, **SMALL, seed=5, split="test")
    assert not torch.equal(a[0][0], other_seed[0][0]) and not torch.equal(a[0][0], other_split[0][0])


def test_variability_across_samples():
    ds = SyntheticThetis(40, **SMALL)
    ps = [ds.params(i) for i in range(40)]
    assert {p.left_handed for p in ps} == {True, False}
    assert np.std([p.scale for p in ps]) > 0.03 and np.std([p.center_x for p in ps]) > 0.03
    assert np.std([p.contact_frame for p in ps]) > 0.5 and np.std([p.backswing_frames for p in ps]) > 0.5
    # handedness is drawn independently of the class: both classes have both hands
    for label in (0, 1):
        assert {p.left_handed for p in ps if p.label == label} == {True, False}


@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("left", [False, True])
def test_mirroring_keeps_the_class(label, left):
    """A mirrored clip is the same stroke by a player of the other hand: same label."""
    rng = np.random.default_rng(label + 2 * left)
    p = sample_params(rng, label, noise=False, left_handed=float(left))
    clip = render_swing(p, 12, 48, 64)
    mirrored = p.mirrored(64 / 48)
    assert mirrored.label == label and mirrored.left_handed != left
    torch.testing.assert_close(render_swing(mirrored, 12, 48, 64), hflip(clip), atol=1e-5, rtol=0)


@pytest.mark.parametrize("left", [False, True])
def test_class_is_relative_to_handedness(left):
    """At contact a forehand meets the ball on the racket-hand side, a backhand across the body;
    the same image-side for a right-handed backhand and a left-handed forehand."""
    hand_side = 1.0 if left else -1.0  # facing the camera, a right-hander's racket hand is on the image's left
    for label in (0, 1):
        p = sample_params(np.random.default_rng(0), label, noise=False, left_handed=float(left))
        k = int(round(p.contact_frame))
        u = float(_pose(p, 28)["racket_b"][k, 0])  # body units, > 0 towards the racket hand
        image_x = p.center_x + hand_side * u * p.scale
        expected = hand_side if label == 0 else -hand_side
        assert np.sign(image_x - p.center_x) == expected and abs(u) > 0.1


def test_framing_is_configurable():
    """scale_range and offset widen the framing (a harder variant); the defaults are THETIS-like."""
    default = SyntheticThetis(40, **SMALL)
    wide = SyntheticThetis(40, **SMALL, scale_range=(0.5, 0.9), offset=0.25)
    ps, pw = [default.params(i) for i in range(40)], [wide.params(i) for i in range(40)]
    assert all(0.6 <= p.scale <= 0.8 for p in ps) and all(0.5 <= p.scale <= 0.9 for p in pw)
    centre = 40 / 32 / 2
    assert max(abs(p.center_x - centre) for p in ps) <= 0.12 + 1e-9
    assert max(abs(p.center_x - centre) for p in pw) > 0.12
    assert np.ptp([p.scale for p in pw]) > np.ptp([p.scale for p in ps])
    assert wide.extra()["scale_range"] == [0.5, 0.9] and wide.extra()["offset"] == 0.25
    fixed = SyntheticThetis(4, **SMALL, scale_range=(0.7, 0.7), offset=0.0)
    assert {fixed.params(i).scale for i in range(4)} == {0.7}
    with pytest.raises(ValueError, match=r"scale_range must be \(low, high\)"):
        SyntheticThetis(2, scale_range=(0.9, 0.5))
    with pytest.raises(ValueError, match="offset must be a number in"):
        SyntheticThetis(2, offset=-0.1)
    with pytest.raises(ValueError, match="offset must be a number in"):
        sample_params(np.random.default_rng(0), 0, offset=2.0)


def test_default_resolution():
    ds = SyntheticThetis(1)
    assert ds.resolution == (80, 128) and thetis_net_for().l1.in_features == thetis_flat_features(28, 80, 128) == 2688
    assert thetis_flat_features(28, 64, 80) == 1152  # the former default (docs/training.md quotes both)


def test_transform_and_errors():
    ds = SyntheticThetis(2, **SMALL, transform=hflip)
    plain = SyntheticThetis(2, **SMALL)
    assert torch.equal(ds[0][0], hflip(plain[0][0]))
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["0"]
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        SyntheticThetis(0)
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticThetis(2, split="dev")
    with pytest.raises(ValueError, match="left_handed must be a fraction"):
        SyntheticThetis(2, left_handed=1.5)
    with pytest.raises(ValueError, match="label must be 0"):
        sample_params(np.random.default_rng(0), 2)


def test_works_with_a_dataloader():
    x, y = next(iter(DataLoader(SyntheticThetis(4, **SMALL), batch_size=4)))
    assert x.shape == (4, 4, 8, 32, 40) and y.tolist() == [0, 1, 0, 1]


def test_linear_probe_separable_and_not():
    x = torch.randn(200, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0, 0, 0] - x[:, 0, 3, 2] > 0).long()
    easy = linear_probe(TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:]), pool=None)
    assert easy.test_accuracy > 0.9 and easy.features == 36
    xor = (x[:, 0, 0, 0] * x[:, 0, 3, 2] > 0).long()  # XOR of two signs: no linear rule
    hard = linear_probe(TensorDataset(x[:100], xor[:100]), TensorDataset(x[100:], xor[100:]), pool=None)
    assert hard.test_accuracy < 0.75
    with pytest.raises(ValueError, match="pool needs one size per spatial dim"):
        linear_probe(TensorDataset(x, y), TensorDataset(x, y), pool=(2, 2, 2))
