"""Applications built on the core: nothing in the core imports them.

- :mod:`tucker_fx.apps.paper`: the paper reproduction (the THETIS net, synthetic THETIS data,
  the linear probe, Table 2, the ``tucker-fx train`` demo);
- :mod:`tucker_fx.apps.mlp`: the MLP example (a Linear-only net, sklearn digits);
- :mod:`tucker_fx.apps.bench`: side-by-side timing of a model's variants (``tucker-fx bench``).

Importing this package imports none of them.

Example:
    >>> import tucker_fx.apps.paper as paper
    >>> paper.THETIS_INPUT_SHAPE
    (1, 4, 28, 120, 160)
"""

__all__: list[str] = []
