"""Small graph helpers that several layers need (rewrite, lowering, validation, Table 2).

Example:
    >>> from types import SimpleNamespace
    >>> from tucker_fx._internal.graph import block_name
    >>> block_name(SimpleNamespace(functional=False, name="features.0", node="features_0"))
    'features.0'
    >>> block_name(SimpleNamespace(functional=True, name="w", node="conv3d.1"))
    'conv3d_1_tucker'
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tucker_fx.planning.plan import LayerPlan

__all__ = ["block_name", "free_attr_name"]


def block_name(entry: LayerPlan) -> str:
    """Where the block of ``entry`` lives in the compressed module: the layer's qualified name
    for a module site, the node name plus ``_tucker`` for a functional one."""
    if not entry.functional:
        return entry.name
    return re.sub(r"\W", "_", entry.node) + "_tucker"


def free_attr_name(gm: object, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first name that ``gm`` has no attribute of (for a
    submodule a pass adds)."""
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
