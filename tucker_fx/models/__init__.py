"""Built-in models by name (``tucker-fx ... --model``): the paper's THETIS net, a 3D ResNet-18,
and small test architectures.

The code lives in :mod:`tucker_fx.apps.paper` (THETIS) and :mod:`tucker_fx.testing` (the others);
this package keeps the registry (:data:`BUILTIN_MODELS`, :func:`get_model`) and the old imports.

Example:
    >>> from tucker_fx.models import get_model
    >>> model, shape = get_model("thetis")
    >>> shape
    (1, 4, 28, 120, 160)
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch.nn as nn

from tucker_fx.apps.paper.model import (
    THETIS_INPUT_SHAPE, THETIS_LAYERS, ThetisNet, thetis_net, thetis_paper_config,
)
from tucker_fx.testing.nets import TEST_MODELS
from tucker_fx.testing.resnet3d import RESNET3D_INPUT_SHAPE, ResNet3d, resnet3d18
from tucker_fx.testing.video import VIDEO_MODELS

__all__ = [
    "THETIS_INPUT_SHAPE", "THETIS_LAYERS", "ThetisNet", "thetis_net", "thetis_paper_config", "RESNET3D_INPUT_SHAPE",
    "ResNet3d", "resnet3d18", "TEST_MODELS", "VIDEO_MODELS", "BUILTIN_MODELS", "get_model",
]

BUILTIN_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "thetis": (thetis_net, THETIS_INPUT_SHAPE),
    "resnet3d18": (resnet3d18, RESNET3D_INPUT_SHAPE),
    **TEST_MODELS,
    **VIDEO_MODELS,
}


def get_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A built-in name (``thetis``, ``resnet3d18``, ...) or ``package.module:factory``.

    Returns the model and its default input shape (``None`` for user factories).
    """
    if spec in BUILTIN_MODELS:
        factory, shape = BUILTIN_MODELS[spec]
        return factory(), shape
    if ":" not in spec:
        raise ValueError(
            f"unknown model {spec!r}: expected one of {sorted(BUILTIN_MODELS)} "
            "or 'package.module:factory'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} returned {type(model).__name__}, expected an nn.Module")
    return model, None
