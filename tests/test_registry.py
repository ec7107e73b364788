"""models.json: schema, register, models list/show/validate/remove, locking and atomicity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orion_cli.errors import RegistryError
from orion_cli.modeldir import sha256_file
from orion_cli.registry import Registry, resolve_model_ref, schema_errors

from conftest import REPO_ROOT

USERS_SHAPE = {
    "models": {
        "support-bot": {
            "id": "mistral-support-q4",
            "name": "Mistral support bot",
            "type": "causal-lm",
            "size_mb": 3900,
            "urls": {
                "base": "/srv/models/mistral-support",
                "shards": [
                    "/srv/models/mistral-support/shard_00.safetensors",
                    "/srv/models/mistral-support/shard_01.safetensors",
                ],
            },
        }
    }
}


def test_schema_accepts_the_shape_users_have():
    assert schema_errors(USERS_SHAPE) == []


def test_shipped_registry_is_valid():
    document = json.loads((REPO_ROOT / "models.json").read_text())
    assert schema_errors(document) == []


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda e: e.pop("id"), "$.models['support-bot']"),
        (lambda e: e.update(type="seq2seq"), "$.models['support-bot'].type"),
        (lambda e: e.update(size_mb="big"), "$.models['support-bot'].size_mb"),
        (lambda e: e.update(sise_mb=3), "$.models['support-bot']"),
        (lambda e: e["urls"].pop("base"), "$.models['support-bot'].urls"),
        (lambda e: e.update(files=[{"path": "a", "bytes": 1, "sha256": "xyz"}]), "$.models['support-bot'].files[0].sha256"),
        (lambda e: e.update(quantization={"level": "q5", "bits": 5}), "$.models['support-bot'].quantization.level"),
    ],
)
def test_schema_rejects_broken_entries(mutate, path):
    document = json.loads(json.dumps(USERS_SHAPE))
    mutate(document["models"]["support-bot"])
    errors = schema_errors(document)
    assert errors, "a broken entry passed the schema"
    assert errors[0][0] == path


def test_register_fills_fields_from_the_directory(orion, tiny_llama):
    result = orion("register", tiny_llama, "--id", "tiny", "--name", "Tiny Llama", "--json")
    assert result.exit_code == 0, result.stderr
    entry = Registry("models.json").get("tiny")
    assert entry == result.json()["entry"]
    assert entry["name"] == "Tiny Llama"
    assert entry["format"] == "safetensors"
    assert entry["architecture"] == "LlamaForCausalLM"
    assert entry["model_type"] == "llama"
    weights = next(f for f in entry["files"] if f["path"] == "model.safetensors")
    assert weights["sha256"] == sha256_file(tiny_llama / "model.safetensors")
    assert weights["bytes"] == (tiny_llama / "model.safetensors").stat().st_size
    total = sum(f["bytes"] for f in entry["files"])
    assert entry["size_mb"] == round(total / 1e6, 3)


def test_existing_key_is_refused_without_force(orion, tiny_models):
    assert orion("register", tiny_models["llama"], "--id", "m").exit_code == 0
    before = Path("models.json").read_bytes()
    result = orion("register", tiny_models["gpt2"], "--id", "m")
    assert result.exit_code == 1
    assert "key 'm' already exists; pass --force" in result.stderr
    assert Path("models.json").read_bytes() == before
    assert orion("register", tiny_models["gpt2"], "--id", "m", "--force").exit_code == 0
    assert Registry("models.json").get("m")["architecture"] == "GPT2LMHeadModel"


def test_register_rejects_a_directory_without_weights(orion, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    result = orion("register", empty, "--id", "x")
    assert result.exit_code == 1
    assert f"PATH {empty}: no weights found" in result.stderr
    assert not Path("models.json").exists()


def test_sixteen_parallel_registrations_keep_every_entry(tiny_llama, tmp_path):
    registry = tmp_path / "shared" / "models.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orion_cli", "register", str(tiny_llama), "--id", f"job-{i}",
             "--registry", str(registry)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(16)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    entries = Registry(registry).entries()
    assert sorted(entries) == sorted(f"job-{i}" for i in range(16))


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"models": {"a": ', "not valid JSON (line 1"),
        (b'{"models": {"a": {"id": "a"}}}', "$.models.a"),
        (b"[]", "registry models.json: $"),
    ],
)
def test_corrupt_registry_is_reported_and_left_unchanged(orion, tiny_llama, content, message):
    Path("models.json").write_bytes(content)
    for args in (("register", tiny_llama, "--id", "x"), ("models", "list"), ("models", "remove", "a")):
        result = orion(*args)
        assert result.exit_code == 1
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    assert Path("models.json").read_bytes() == content


def test_relative_paths_resolve_against_the_registry_folder(orion, tiny_llama, tmp_path, monkeypatch):
    project = tmp_path / "project"
    model = project / "models" / "tiny"
    model.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_llama, model)
    registry = project / "models.json"
    assert orion("register", model, "--id", "tiny", "--registry", registry).exit_code == 0
    entry = Registry(registry).get("tiny")
    assert entry["urls"]["base"] == "models/tiny"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shown = orion("models", "show", "tiny", "--registry", registry, "--json").json()
    assert Path(shown["path"]) == model
    assert resolve_model_ref("tiny", registry) == (model, "tiny")


def test_models_commands_json(orion, tiny_models):
    orion("register", tiny_models["llama"], "--id", "a")
    orion("register", tiny_models["qwen2"], "--id", "b")
    listed = orion("models", "list", "--json").json()
    assert sorted(listed["models"]) == ["a", "b"]
    shown = orion("--json", "models", "show", "b").json()
    assert shown["entry"]["architecture"] == "Qwen2ForCausalLM"
    valid = orion("models", "validate", "--check-files", "--json")
    assert valid.exit_code == 0 and valid.json()["valid"] is True
    removed = orion("models", "remove", "a", "--json").json()
    assert removed["removed"] == "a"
    assert sorted(Registry("models.json").entries()) == ["b"]


def test_validate_reports_changed_files(orion, tiny_llama, tmp_path):
    import shutil

    model = tmp_path / "copy"
    shutil.copytree(tiny_llama, model)
    orion("register", model, "--id", "c")
    with open(model / "model.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        byte = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert orion("models", "validate").exit_code == 0  # paths still exist
    result = orion("models", "validate", "--check-files", "--json")
    assert result.exit_code == 1
    index = [f["path"] for f in Registry("models.json").get("c")["files"]].index("model.safetensors")
    assert result.json()["problems"] == [f"$.models.c.files[{index}]: model.safetensors does not match its sha256"]


def test_unknown_key_suggests_a_close_one(tiny_llama, orion):
    orion("register", tiny_llama, "--id", "llama-q4")
    result = orion("models", "show", "llama-q5")
    assert result.exit_code == 1
    assert "did you mean 'llama-q4'" in result.stderr
    with pytest.raises(RegistryError, match="neither a directory nor a key"):
        resolve_model_ref("nothing-here", "models.json")
