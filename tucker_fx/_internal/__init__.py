"""Internal helpers shared by every layer of the core; not a public API.

- :mod:`~tucker_fx._internal.meta`: the ``node.meta`` / ``gm.meta`` keys the package writes,
  with typed accessors;
- :mod:`~tucker_fx._internal.graph`: small FX graph helpers used by passes and validation;
- :mod:`~tucker_fx._internal.progress` and :mod:`~tucker_fx._internal.timing`: progress lines
  and wall-clock timing.

This room imports nothing else from the package at run time, so any layer may import it.

Example:
    >>> from tucker_fx._internal import meta
    >>> meta.SITE_KEY
    'tucker_fx.site'
"""

__all__: list[str] = []
