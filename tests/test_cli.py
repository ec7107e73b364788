"""The CLI contract: help with examples, --version, exit codes, one-line errors."""

from __future__ import annotations

import pytest

from orion_cli import __version__

from conftest import orion_process

COMMANDS = [
    ("register",),
    ("models",),
    ("models", "list"),
    ("models", "show"),
    ("models", "validate"),
    ("models", "remove"),
]


def test_top_level_help_lists_the_commands(orion):
    result = orion("--help")
    assert result.exit_code == 0
    for name in ("quantize", "merge", "shard", "register", "models", "serve"):
        assert name in result.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(orion, command):
    result = orion(*command, "--help")
    assert result.exit_code == 0, result.stderr
    assert "Example" in result.stdout or command == ("models",)
    assert "--help" in result.stdout


def test_version(orion):
    result = orion("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"orion {__version__}"


def test_usage_errors_exit_2(orion):
    assert orion("no-such-command").exit_code == 2
    assert orion("register").exit_code == 2  # missing PATH and --id
    assert orion("models", "list", "--bogus").exit_code == 2


def test_errors_are_one_line_without_traceback_unless_verbose():
    quiet = orion_process("models", "show", "missing", "--registry", "absent.json")
    assert quiet.returncode == 1
    assert quiet.stderr.strip() == "orion: error: registry absent.json: no model with key 'missing'"
    loud = orion_process("--verbose", "models", "show", "missing", "--registry", "absent.json")
    assert loud.returncode == 1
    assert "Traceback" in loud.stderr
    assert loud.stderr.strip().endswith("orion: error: registry absent.json: no model with key 'missing'")


def test_json_errors_are_one_document_on_stdout(orion):
    result = orion("--json", "models", "show", "missing")
    assert result.exit_code == 1
    assert result.json()["error"]["type"] == "RegistryError"


def test_ctrl_c_is_reported_as_interrupted_with_exit_130(orion, monkeypatch):
    from orion_cli.registry import Registry

    def interrupted(self):
        raise KeyboardInterrupt  # what SIGINT raises wherever the command happens to be

    monkeypatch.setattr(Registry, "entries", interrupted)
    result = orion("models", "list")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == "orion: error: interrupted"
