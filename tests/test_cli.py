"""The CLI contract: help with examples, --version, exit codes, one-line errors."""

from __future__ import annotations

import pytest

from orion_cli import __version__
from generate_docs import command_paths

from conftest import orion_process

COMMANDS = list(command_paths())
GROUPS = {("models",)}


def test_the_commands_are_the_documented_ones():
    assert {path[0] for path in COMMANDS} == {"quantize", "merge", "shard", "register", "models", "serve", "run", "demo"}
    assert {path for path in COMMANDS if path[0] == "models"} == {("models",), *(("models", c) for c in ("list", "show", "validate", "remove"))}


def test_top_level_help_lists_the_commands(orion):
    result = orion("--help")
    assert result.exit_code == 0
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert {"quantize", "merge", "shard", "register", "models", "serve", "run", "demo"} <= listed


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example_of_itself(orion, command):
    result = orion(*command, "--help")
    assert result.exit_code == 0, result.stderr
    assert "--help" in result.stdout
    if command not in GROUPS:
        assert "Example" in result.stdout
        assert f"orion {' '.join(command)} " in result.stdout, "the examples must show the command itself"
        assert "--json" in result.stdout, "every command offers --json"


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
    assert quiet.stderr.strip() == "orion: error: registry absent.json: no such file (orion register creates it)"
    loud = orion_process("--verbose", "models", "show", "missing", "--registry", "absent.json")
    assert loud.returncode == 1
    assert "Traceback" in loud.stderr
    assert loud.stderr.strip().endswith("orion: error: registry absent.json: no such file (orion register creates it)")


def test_json_errors_are_one_document_on_stdout(orion):
    result = orion("--json", "models", "show", "missing")
    assert result.exit_code == 1
    assert result.json()["error"]["type"] == "RegistryError"


def test_ctrl_c_is_reported_as_interrupted_with_exit_130(orion, monkeypatch):
    from orion_cli.registry import Registry

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # what SIGINT raises wherever the command happens to be

    monkeypatch.setattr(Registry, "entries", interrupted)
    result = orion("models", "list")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == "orion: error: interrupted"
