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


@pytest.mark.parametrize("name", ["tucker_fx"] + MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
