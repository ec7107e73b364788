"""orion demo: the main job on the built-in reference model."""

from __future__ import annotations

import pytest

from orion_cli.registry import Registry


@pytest.mark.slow
def test_demo_registers_the_reference_model(orion, reference_model, tmp_path):
    workdir = tmp_path / "demo"
    result = orion("demo", "--workdir", workdir, "--json")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["reference_model"] == str(reference_model)
    assert summary["reference"]["heldout_perplexity"] > 1
    entry = Registry(workdir / "models.json").get("reference")
    assert entry["architecture"] == "LlamaForCausalLM"
    assert entry["provenance"]["operation"] == "train"
