"""The producing frame every command that writes a model runs in: checks first, provenance, nothing half-done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orion_cli.errors import OutputExistsError, UsageError
from orion_cli.producing import Output, producing, recorded_provenance, resolve_source


def test_provenance_is_recorded_and_the_output_registered(tiny_llama, tmp_path):
    source = resolve_source("--model", str(tiny_llama), tmp_path / "models.json")
    output = Output(tmp_path / "out", register="made", registry=tmp_path / "models.json")
    with producing("shard", [source], output, default_name="unused", parameters={"shards": 2}) as out:
        (out.tmp / "config.json").write_text((tiny_llama / "config.json").read_text())
        (out.tmp / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
        out.metadata["note"] = {"written": True}
    provenance = recorded_provenance(tmp_path / "out")
    assert provenance["operation"] == "shard" and provenance["parameters"] == {"shards": 2}
    assert provenance["sources"][0]["path"] == str(tiny_llama.resolve())
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["note"] == {"written": True}
    assert out.registered == "made"
    registry = json.loads((tmp_path / "models.json").read_text())
    assert registry["models"]["made"]["provenance"] == provenance


def test_everything_is_checked_before_the_body_runs(tiny_llama, tmp_path):
    source = resolve_source("--model", str(tiny_llama), tmp_path / "models.json")
    ran = []
    (tmp_path / "taken").mkdir()
    for output, error in ((tmp_path / "taken", OutputExistsError), (tiny_llama / "inside", UsageError)):
        with pytest.raises(error):
            with producing("shard", [source], Output(output), default_name="x", parameters={}):
                ran.append(output)
    assert ran == []


def test_a_source_that_cannot_be_hashed_fails_the_command_and_leaves_nothing(tiny_llama, tmp_path):
    mine = tmp_path / "mine"
    shutil.copytree(tiny_llama, mine)
    source = resolve_source("--model", str(mine), tmp_path / "models.json")
    (mine / "model.safetensors").unlink()  # gone between the checks and the hashing
    with pytest.raises(FileNotFoundError):
        with producing("shard", [source], Output(tmp_path / "out"), default_name="x", parameters={}) as out:
            (out.tmp / "model.safetensors").write_bytes(b"work done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "work"]  # no output, no temporary sibling


def test_the_default_output_is_named_under_the_output_root(tiny_llama, tmp_path):
    source = resolve_source("--model", str(tiny_llama), tmp_path / "models.json")
    with producing("shard", [source], Output(output_root=tmp_path / "outputs"), default_name="llama-sharded",
                   parameters={}) as out:
        pass
    assert out.output == (tmp_path / "outputs" / "llama-sharded").absolute() and out.output.is_dir()
    assert Path(out.output / "metadata.json").is_file()
