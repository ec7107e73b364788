"""orion demo: the main job on the built-in reference model, from the CLI, with a real server."""

from __future__ import annotations

import json

import psutil
import pytest

from orion_cli.registry import Registry

from conftest import orion_process


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_prepares_serves_answers_and_stops(reference_model, tmp_path):
    workdir = tmp_path / "demo"
    before = {p.pid for p in psutil.process_iter()}
    result = orion_process("demo", "--workdir", workdir, "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)

    assert summary["reference"]["path"] == str(reference_model)
    registry = Registry(workdir / "models.json")
    q4, sharded = registry.get("reference-q4"), registry.get("reference-sharded")
    assert q4["format"] == "onnx" and q4["quantization"]["level"] == "q4"
    assert sharded["format"] == "safetensors" and len(sharded["urls"]["shards"]) == 4
    assert summary["quantized"]["size_mb"] < summary["reference"]["size_mb"] / 3

    quality = summary["quantized"]["quality"]
    assert quality["perplexity"] > 1 and 0.8 < quality["top1_agreement"] <= 1
    served = summary["served"]
    assert served["tp"] == 2 and served["completion_tokens"] > 0 and served["answer"].strip()
    assert served["stopped_by"] == "SIGTERM"

    # the server and its workers are gone
    leftover = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                and "orion_cli" in " ".join(p.info["cmdline"] or [])]
    assert not leftover

    # a second run reuses what is up to date and serves again
    again = orion_process("demo", "--workdir", workdir, "--json", timeout=600)
    assert again.returncode == 0, again.stderr
    assert {s["action"] for s in json.loads(again.stdout)["steps"]} == {"skip"}


def test_demo_help_has_an_example(orion):
    result = orion("demo", "--help")
    assert result.exit_code == 0 and "orion demo --workdir" in result.stdout
