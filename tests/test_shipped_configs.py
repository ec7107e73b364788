"""Every YAML shipped under configs/ is loaded and validated as what it is.

Three kinds live there: orion config files (default.yaml and the like), pipelines
for `orion run` (a `steps:` list; test_pipeline.py also runs each one on tiny
models) and mergekit YAMLs for `orion merge --config` (configs/merge/).
"""

from __future__ import annotations

import pytest
import yaml

from orion_cli.config import OrionConfig, load_config
from orion_cli.workflow import is_pipeline_file, load_pipeline
from orion_cli.resources import configs_dir

SHIPPED = sorted(configs_dir().rglob("*.yaml"))
MERGE_EXAMPLES = configs_dir() / "merge"


def kind_of(path) -> str:
    if MERGE_EXAMPLES in path.parents:
        return "merge"
    return "pipeline" if is_pipeline_file(yaml.safe_load(path.read_text()) or {}) else "config"


def shipped(kind: str):
    return pytest.mark.parametrize("path", [p for p in SHIPPED if kind_of(p) == kind],
                                   ids=lambda p: p.relative_to(configs_dir()).as_posix())


def test_there_are_shipped_configs_of_every_kind():
    assert any(p.name == "default.yaml" for p in SHIPPED)
    assert {kind_of(p) for p in SHIPPED} == {"config", "pipeline", "merge"}


@shipped("config")
def test_shipped_config_loads(path):
    assert isinstance(load_config(path, environ={}), OrionConfig)


@shipped("pipeline")
def test_shipped_pipeline_loads(path):
    pipeline = load_pipeline(path)
    assert pipeline.steps and pipeline.description


@shipped("merge")
def test_shipped_merge_example_validates(path):
    from orion_cli.merge import read_merge_config

    assert read_merge_config(path).merge_method
