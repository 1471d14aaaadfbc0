"""Test support: a zoo of real networks to run the whole pipeline on, and the in-house test
architectures (:mod:`~tucker_fx.testing.nets`, :mod:`~tucker_fx.testing.video`,
:mod:`~tucker_fx.testing.resnet3d`).

Example:
    >>> from tucker_fx.testing import ZOO
    >>> "monai_unet_bn" in ZOO
    True
"""

from tucker_fx.testing.nets import TEST_MODELS, seeded
from tucker_fx.testing.resnet3d import RESNET3D_INPUT_SHAPE, ResNet3d, resnet3d18
from tucker_fx.testing.video import VIDEO_MODELS, Swin3dSeg, VideoUNet
from tucker_fx.testing.zoo import ZOO, ZooEntry, available, build, flat_outputs, names, randomize_norms, rel_error

__all__ = ["ZOO", "ZooEntry", "build", "names", "available", "randomize_norms", "flat_outputs", "rel_error",
           "TEST_MODELS", "VIDEO_MODELS", "seeded", "RESNET3D_INPUT_SHAPE", "ResNet3d", "resnet3d18", "VideoUNet",
           "Swin3dSeg"]
