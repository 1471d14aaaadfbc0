import os
from pathlib import Path

import pytest
import torch

# ---- test tiers --------------------------------------------------------------------------------
# Plain ``pytest`` (or ``pytest tests``) is the fast development loop: the tests marked
# ``@pytest.mark.slow`` (inductor compiles, torchrun, full-size models, anything over ~5 s) are
# deselected, and the property tests draw fewer examples. ``--run-slow`` runs everything: the
# README's (and CI's) test command passes it. benchmarks/conftest.py registers the same option
# and deselects the slow benchmarks the same way; each conftest handles its own folder.

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    try:
        parser.addoption("--run-slow", action="store_true", default=False,
                         help="also run the tests marked slow (the README's full test command does)")
    except ValueError:  # registered already by benchmarks/conftest.py
        pass


def pytest_configure(config):
    # tests/test_properties.py: a few derandomized examples in the fast loop, the ci profile in the full run
    os.environ.setdefault("HYPOTHESIS_PROFILE", "ci" if config.getoption("--run-slow") else "fast")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None and HERE in item.path.parents]
    if slow:
        skip = set(map(id, slow))
        items[:] = [item for item in items if id(item) not in skip]
        config.hook.pytest_deselected(items=slow)


def pytest_report_header(config):
    if not config.getoption("--run-slow"):
        return "fast loop: tests marked slow are deselected; --run-slow runs them too"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
