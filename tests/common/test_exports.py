"""Each package's public surface is its ``__all__`` (ruff keeps it sorted); every name in it exists."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["services.common", "services.auth", "services.gateway"]


@pytest.mark.parametrize("name", PACKAGES)
def test_exports_are_unique_and_importable(name):
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    for symbol in exported:
        assert hasattr(module, symbol), symbol
