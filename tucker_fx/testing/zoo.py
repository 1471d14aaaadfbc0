"""A zoo of real 3D networks that nobody here wrote (MONAI), plus the in-house video models, in
small configurations that run a forward in well under 0.3 s on 2 CPU cores.

Each :class:`ZooEntry` has a factory building the model in eval mode with seeded weights (the
caller's random state is kept); normalisation layers get non-trivial running statistics and affine
parameters, so BatchNorm folding and normalisation are really exercised. MONAI is imported inside
the factories only: ``import tucker_fx.testing.zoo`` does not import it, and
:func:`available` tells whether an entry's requirements are installed.

Example:
    >>> from tucker_fx.testing.zoo import ZOO, build
    >>> model, x = build("swin3d_seg")
    >>> tuple(model(x).shape), ZOO["swin3d_seg"].tags
    ((1, 3, 4, 16, 16), ('layernorm', 'transformer', 'swin', 'in_house'))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["ZooEntry", "ZOO", "build", "names", "available", "randomize_norms", "flat_outputs", "rel_error"]


@dataclass(frozen=True)
class ZooEntry:
    """``factory(seed)`` builds the eval-mode model; ``input_shape`` is its example input's shape;
    ``tags`` describe it (norm kind, family, ``"transformer"``, ``"in_house"``, ``"monai"``);
    ``requires`` lists the importable packages the factory needs."""

    name: str
    factory: Callable[[int], nn.Module]
    input_shape: tuple[int, ...]
    tags: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    notes: str = ""

    def build(self, seed: int = 0) -> nn.Module:
        """The model with weights drawn from ``seed`` (the caller's random state is kept), in eval mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.factory(seed)
            randomize_norms(model)
        return model.eval()

    def example_input(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        """A seeded standard-normal input of ``input_shape`` (its batch replaced by ``batch``)."""
        shape = self.input_shape if batch is None else (batch, *self.input_shape[1:])
        gen = torch.Generator().manual_seed(1000 + seed)
        return torch.randn(shape, generator=gen)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every BatchNorm/InstanceNorm/GroupNorm/LayerNorm non-trivial affine parameters and running
    statistics (from torch's current random stream), as a trained checkpoint has; returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _NORMS):
                continue
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.uniform_(-0.2, 0.2)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(-0.2, 0.2)
            if getattr(m, "running_var", None) is not None:
                m.running_var.uniform_(0.5, 1.5)
    return model


# --- MONAI factories (monai imported lazily) -------------------------------------------------------

def _unet_batch(seed: int) -> nn.Module:
    from monai.networks.nets import UNet
    return UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch")


def _unet_instance(seed: int) -> nn.Module:
    from monai.networks.nets import UNet
    return UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm="instance")


def _basic_unet(seed: int) -> nn.Module:
    from monai.networks.nets import BasicUNet
    # BatchNorm: at 16^3 the bottleneck is 1x1x1, where InstanceNorm (MONAI's default) refuses to run
    return BasicUNet(3, 1, 2, features=(8, 8, 16, 16, 32, 8), norm="batch")


def _segresnet(seed: int) -> nn.Module:
    from monai.networks.nets import SegResNet
    return SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1), blocks_up=(1, 1))


def _dynunet(seed: int) -> nn.Module:
    from monai.networks.nets import DynUNet
    return DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                   filters=[8, 16, 32], res_block=True, deep_supervision=False)


def _attention_unet(seed: int) -> nn.Module:
    from monai.networks.nets import AttentionUnet
    return AttentionUnet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2))


def _densenet(seed: int) -> nn.Module:
    from monai.networks.nets import DenseNet
    return DenseNet(3, 1, 3, init_features=16, growth_rate=8, block_config=(2, 2, 2), bn_size=2)


def _resnet10(seed: int) -> nn.Module:
    from monai.networks.nets import ResNet
    # resnet10's structure (basic blocks, one per stage) at a quarter of its width
    return ResNet("basic", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=3, n_input_channels=1, num_classes=3)


def _unetr(seed: int) -> nn.Module:
    from monai.networks.nets import UNETR
    return UNETR(1, 2, img_size=16, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)


def _swin_unetr(seed: int) -> nn.Module:
    from monai.networks.nets import SwinUNETR
    return SwinUNETR(1, 2, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), feature_size=12, window_size=4,
                     norm_name="batch")


def _autoencoder(seed: int) -> nn.Module:
    from monai.networks.nets import AutoEncoder
    return AutoEncoder(3, 1, 1, channels=(8, 16, 32), strides=(2, 2, 2), num_res_units=1)


def _var_autoencoder(seed: int) -> nn.Module:
    from monai.networks.nets import VarAutoEncoder
    return VarAutoEncoder(3, in_shape=(1, 16, 16, 16), out_channels=1, latent_size=8, channels=(8, 16, 32),
                          strides=(2, 2, 2), use_mean_at_inference=True)


def _segresnet_vae(seed: int) -> nn.Module:
    from monai.networks.nets import SegResNetVAE
    return SegResNetVAE(input_image_size=(16, 16, 16), vae_nz=16, init_filters=8, in_channels=1, out_channels=2,
                        blocks_down=(1, 1, 1), blocks_up=(1, 1))


def _highresnet(seed: int) -> nn.Module:
    from monai.networks.nets import HighResNet
    layers = (
        {"name": "conv_0", "n_features": 8, "kernel_size": 3},
        {"name": "res_1", "n_features": 8, "kernels": (3, 3), "repeat": 1},
        {"name": "res_2", "n_features": 16, "kernels": (3, 3), "repeat": 1},
        {"name": "res_3", "n_features": 32, "kernels": (3, 3), "repeat": 1},
        {"name": "conv_1", "n_features": 32, "kernel_size": 1},
        {"name": "conv_2", "kernel_size": 1},
    )
    return HighResNet(3, 1, 2, layer_params=layers)


def _vnet(seed: int) -> nn.Module:
    from monai.networks.nets import VNet
    return VNet(3, 1, 2)


# --- in-house video models -------------------------------------------------------------------------

def _video_unet(seed: int) -> nn.Module:
    from tucker_fx.testing.video import VideoUNet
    return VideoUNet(width=16, temb=16)


def _swin3d_seg(seed: int) -> nn.Module:
    from tucker_fx.testing.video import Swin3dSeg
    return Swin3dSeg(dim=16)


def _resnet3d_small(seed: int) -> nn.Module:
    from tucker_fx.testing.resnet3d import ResNet3d
    return ResNet3d((1, 1, 1, 1), num_classes=10)


_M = ("monai",)
_MT = ("monai", "einops")

_ENTRIES = [
    ZooEntry("monai_unet_bn", _unet_batch, (1, 1, 16, 16, 16), ("batchnorm", "unet", "monai"), _M),
    ZooEntry("monai_unet_in", _unet_instance, (1, 1, 16, 16, 16), ("instancenorm", "unet", "monai"), _M),
    ZooEntry("monai_basic_unet", _basic_unet, (1, 1, 16, 16, 16), ("batchnorm", "unet", "monai"), _M),
    ZooEntry("monai_segresnet", _segresnet, (1, 1, 16, 16, 16),
             ("groupnorm", "preactivation", "resnet", "monai"), _M),
    ZooEntry("monai_dynunet", _dynunet, (1, 1, 16, 16, 16), ("instancenorm", "unet", "monai"), _M),
    ZooEntry("monai_attention_unet", _attention_unet, (1, 1, 16, 16, 16),
             ("batchnorm", "unet", "attention", "monai"), _M),
    ZooEntry("monai_densenet", _densenet, (1, 1, 16, 16, 16), ("batchnorm", "densenet", "classifier", "monai"), _M),
    ZooEntry("monai_resnet10", _resnet10, (1, 1, 16, 16, 16), ("batchnorm", "resnet", "classifier", "monai"), _M),
    ZooEntry("monai_unetr", _unetr, (1, 1, 16, 16, 16), ("instancenorm", "layernorm", "transformer", "unet", "monai"),
             _MT),
    ZooEntry("monai_swin_unetr", _swin_unetr, (1, 1, 32, 32, 32),
             ("batchnorm", "layernorm", "transformer", "swin", "unet", "monai"), _MT),
    ZooEntry("monai_autoencoder", _autoencoder, (1, 1, 16, 16, 16), ("instancenorm", "autoencoder", "monai"), _M),
    ZooEntry("monai_var_autoencoder", _var_autoencoder, (1, 1, 16, 16, 16),
             ("instancenorm", "vae", "autoencoder", "monai"), _M),
    ZooEntry("monai_segresnet_vae", _segresnet_vae, (1, 1, 16, 16, 16),
             ("groupnorm", "preactivation", "vae", "resnet", "monai"), _M,
             "the VAE branch runs in training only: eval leaves its layers unused"),
    ZooEntry("monai_highresnet", _highresnet, (1, 1, 16, 16, 16), ("batchnorm", "dilated", "resnet", "monai"), _M),
    ZooEntry("monai_vnet", _vnet, (1, 1, 16, 16, 16), ("batchnorm", "unet", "vnet", "heavy", "monai"), _M,
             "VNet's widths are fixed (16..256 channels, 45.6M parameters): too heavy for the fast tier"),
    ZooEntry("video_unet", _video_unet, (1, 4, 4, 16, 16),
             ("groupnorm", "layernorm", "transformer", "video", "diffusion", "in_house")),
    ZooEntry("swin3d_seg", _swin3d_seg, (1, 1, 4, 16, 16), ("layernorm", "transformer", "swin", "in_house")),
    ZooEntry("resnet3d_small", _resnet3d_small, (1, 3, 4, 16, 16), ("batchnorm", "resnet", "heavy", "in_house"),
             notes="ResNet3d's widths are fixed (64..512 channels, 14.4M parameters): too heavy for the fast tier"),
]

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def names(tag: str | None = None) -> list[str]:
    """The zoo's names, those with ``tag`` only when given."""
    return [n for n, e in ZOO.items() if tag is None or tag in e.tags]


def available(name: str) -> bool:
    """Whether the packages that entry ``name`` needs are importable."""
    return all(importlib.util.find_spec(p) is not None for p in ZOO[name].requires)


def build(name: str, seed: int = 0, batch: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """``(model, example_input)`` for zoo entry ``name``: the eval-mode model seeded with ``seed``
    and a seeded input (batch ``batch`` if given)."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}: expected one of {sorted(ZOO)}")
    entry = ZOO[name]
    missing = [p for p in entry.requires if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"zoo model {name!r} needs {', '.join(missing)} (pip install tucker_fx[test])")
    return entry.build(seed), entry.example_input(batch)


def flat_outputs(out: object) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or a tuple/list/dict holding tensors and ``None``), in order."""
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def rel_error(reference: object, output: object) -> float:
    """||y - y_hat|| / ||y|| over all the tensors of two outputs (in float64); ``inf`` if their
    structure or shapes differ."""
    ys, yhats = flat_outputs(reference), flat_outputs(output)
    if len(ys) != len(yhats) or any(a.shape != b.shape for a, b in zip(ys, yhats)):
        return float("inf")
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(ys, yhats))
    den = sum(float(a.double().pow(2).sum()) for a in ys)
    return (num / max(den, 1e-300)) ** 0.5
