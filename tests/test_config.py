"""The config layer: shipped files, validation messages, and precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from orion_cli.config import OrionConfig, load_config
from orion_cli.errors import ConfigError


def test_defaults_cover_every_key():
    config = load_config(environ={})
    assert isinstance(config, OrionConfig)
    assert config.registry == "models.json"
    assert config.serve.host == "127.0.0.1"


def test_config_file_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("quantize:\n  block_size: 64\nserve:\n  port: 9000\n")
    config = load_config(path, environ={})
    assert config.quantize.block_size == 64
    assert config.serve.port == 9000
    assert config.serve.host == "127.0.0.1"  # untouched keys keep the default


def test_environment_overrides_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("serve:\n  port: 9000\n")
    config = load_config(path, environ={"ORION_SERVE_PORT": "9100", "ORION_REGISTRY": "env.json"})
    assert config.serve.port == 9100
    assert config.registry == "env.json"


def test_orion_config_variable_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_root: elsewhere\n")
    assert load_config(environ={"ORION_CONFIG": str(path)}).output_root == "elsewhere"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("serve:\n  prot: 1\n", "key 'serve.prot': unknown key"),
        ("serve:\n  port: many\n", "key 'serve.port'"),
        ("quantize:\n  level: q5\n", "key 'quantize.level'"),
        ("shard:\n  shards: 0\n", "key 'shard.shards'"),
        ("frobnicate: 1\n", "key 'frobnicate': unknown key"),
    ],
)
def test_bad_config_file_names_file_and_key(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("serve:\n  port: 1\n  host: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_config(path, environ={})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_bad_environment_variable_is_named():
    with pytest.raises(ConfigError, match="ORION_SERVE_PORT"):
        load_config(environ={"ORION_SERVE_PORT": "eighty"})
    with pytest.raises(ConfigError, match="ORION_SERVE_PROT: 'serve' has no key 'prot'"):
        load_config(environ={"ORION_SERVE_PROT": "80"})


def test_unrelated_orion_variables_are_ignored():
    assert load_config(environ={"ORION_SOMETHING_ELSE": "x"}).registry == "models.json"


def test_precedence_through_the_cli(orion, tmp_path, monkeypatch):
    """CLI flag > ORION_* > --config FILE > default, observed on the registry path."""
    config = tmp_path / "c.yaml"
    config.write_text("registry: from-file.json\n")
    for name in ("models.json", "from-file.json", "from-env.json", "from-flag.json"):
        Path(name).write_text('{"models": {}}\n')

    def registry_used(*args):
        result = orion(*args, "models", "list", "--json")
        assert result.exit_code == 0, result.stderr
        return Path(result.json()["registry"]).name

    assert registry_used() == "models.json"
    assert registry_used("--config", config) == "from-file.json"
    monkeypatch.setenv("ORION_REGISTRY", "from-env.json")
    assert registry_used("--config", config) == "from-env.json"
    result = orion("--config", config, "models", "list", "--registry", "from-flag.json", "--json")
    assert Path(result.json()["registry"]).name == "from-flag.json"


def test_bad_config_through_the_cli_exits_2(orion, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("serve:\n  port: -1\n")
    result = orion("--config", config, "models", "list")
    assert result.exit_code == 2
    assert "serve.port" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr
