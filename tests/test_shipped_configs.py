"""Every YAML shipped under configs/ loads and validates."""

from __future__ import annotations

import pytest

from orion_cli.config import OrionConfig, load_config
from orion_cli.resources import configs_dir

SHIPPED = sorted(configs_dir().rglob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "default.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(configs_dir()).as_posix())
def test_shipped_config_loads(path):
    assert isinstance(load_config(path, environ={}), OrionConfig)
