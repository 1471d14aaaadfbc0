"""Every public docstring example runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import tucker_fx

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(tucker_fx.__path__, prefix="tucker_fx.")
    if not m.name.endswith("__main__")
)


# these modules' examples compress or train full-size models (5-20 s each)
SLOW = {"tucker_fx.reporting.table2", "tucker_fx.reporting.train_demo", "tucker_fx.planning.plan",
        "tucker_fx.apps.paper.table2", "tucker_fx.apps.paper.train_demo"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in ["tucker_fx"] + MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
