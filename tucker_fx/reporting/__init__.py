"""Moved: validation is core (:mod:`tucker_fx.validation`), progress and timing are internal
(:mod:`tucker_fx._internal`), Table 2, the training demo and bench are applications
(:mod:`tucker_fx.apps`). The modules here stay so that old imports keep working."""
