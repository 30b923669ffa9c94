"""The runnable examples in public docstrings stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "trainstate.api",
    "trainstate.rng",
    "trainstate.run",
    "trainstate.data",
    "trainstate.manager.checkpoint_manager",
    "trainstate.manager.early_stopping",
    "trainstate.storage",
    "trainstate.integrations.accelerate",
    "trainstate.integrations.lightning",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
