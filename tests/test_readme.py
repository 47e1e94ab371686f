"""The README documents every setting, and names no setting that does not exist."""

from __future__ import annotations

import re

import pytest

from services.common.settings import env_name
from tests.conftest import REPO, SERVICES

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_setting_is_documented(name):
    settings_cls, _ = SERVICES[name]
    for field in settings_cls.model_fields:
        assert f"`{env_name(settings_cls, field)}`" in README


def test_readme_names_only_real_settings():
    known = {env_name(cls, field) for cls, _ in SERVICES.values() for field in cls.model_fields}
    mentioned = set(re.findall(r"`((?:AUTH|GATEWAY|INFERENCE)_[A-Z_]+)`", README))
    assert mentioned <= known, mentioned - known


def test_readme_leads_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "make run" in first_block
    assert "make test" in first_block
