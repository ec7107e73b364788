"""orion run: pipelines of steps, their references, skipping and failures; every shipped pipeline on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orion_cli.registry import Registry
from orion_cli.resources import configs_dir
from tiny_models import build_tiny_model

SHARD_AND_REGISTER = """\
pipeline: small
vars:
  model: {model}
  out: outputs/small
steps:
  - id: split
    shard: {{model: "${{vars.model}}", output: "${{vars.out}}/sharded", shards: 2}}
  - id: publish
    register: {{model: "${{steps.split.output}}", key: small}}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def own_model(tmp_path) -> Path:
    """A tiny model this test may change (the session's tiny models are shared)."""
    return build_tiny_model("llama", tmp_path / "own-llama", seed=1)


def test_dry_run_resolves_every_reference_and_writes_nothing(orion, tiny_llama, tmp_path):
    pipeline = write(tmp_path / "p.yaml", SHARD_AND_REGISTER.format(model=tiny_llama))
    result = orion("run", pipeline, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = result.json()
    assert [(s["id"], s["action"]) for s in plan["steps"]] == [("split", "plan"), ("publish", "plan")]
    assert plan["steps"][0]["detail"]["model"] == str(tiny_llama)
    assert plan["steps"][1]["detail"]["model"] == "outputs/small/sharded"
    assert not Path("outputs").exists() and not Path("models.json").exists()


def test_shipped_pipeline_dry_run_names_the_reference_model_without_building_it(orion, tmp_path, monkeypatch):
    monkeypatch.setenv("ORION_CACHE_DIR", str(tmp_path / "empty-cache"))
    result = orion("run", configs_dir() / "pipeline.yaml", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    first = result.json()["steps"][0]
    assert first["detail"]["model"].startswith(str(tmp_path / "empty-cache"))
    assert first["detail"]["level"] == "q4"
    assert not (tmp_path / "empty-cache").exists()


def test_steps_run_in_order_then_skip_when_up_to_date(orion, own_model, tmp_path):
    pipeline = write(tmp_path / "p.yaml", SHARD_AND_REGISTER.format(model=own_model))
    first = orion("run", pipeline, "--json")
    assert first.exit_code == 0, first.stderr
    assert [s["action"] for s in first.json()["steps"]] == ["run", "run"]
    entry = Registry("models.json").get("small")
    assert entry["provenance"]["operation"] == "shard" and len(entry["urls"]["shards"]) == 2

    again = orion("run", pipeline, "--json")
    assert [s["action"] for s in again.json()["steps"]] == ["skip", "skip"]
    forced = orion("run", pipeline, "--force", "--json")
    assert [s["action"] for s in forced.json()["steps"]] == ["run", "run"]


def test_a_changed_input_reruns_the_steps_after_it(orion, own_model, tmp_path):
    pipeline = write(tmp_path / "p.yaml", SHARD_AND_REGISTER.format(model=own_model))
    assert orion("run", pipeline).exit_code == 0
    before = Registry("models.json").get("small")["files"]
    shutil.rmtree(own_model)
    build_tiny_model("llama", own_model, seed=2)  # same place, other weights

    result = orion("run", pipeline, "--json")
    assert result.exit_code == 0, result.stderr
    assert [s["action"] for s in result.json()["steps"]] == ["run", "run"]
    assert Registry("models.json").get("small")["files"] != before


def test_changed_parameters_rerun_the_step(orion, own_model, tmp_path):
    pipeline = write(tmp_path / "p.yaml", SHARD_AND_REGISTER.format(model=own_model))
    assert orion("run", pipeline).exit_code == 0
    write(pipeline, pipeline.read_text().replace("shards: 2", "shards: 3"))
    result = orion("run", pipeline, "--json")
    assert [s["action"] for s in result.json()["steps"]] == ["run", "run"]
    assert len(Registry("models.json").get("small")["urls"]["shards"]) == 3


def test_a_failing_step_is_named_and_earlier_outputs_stay(orion, tiny_llama, tmp_path):
    text = SHARD_AND_REGISTER.format(model=tiny_llama) + (
        '  - id: broken\n    shard: {model: "${vars.out}/nowhere", output: "${vars.out}/never", shards: 2}\n'
    )
    pipeline = write(tmp_path / "p.yaml", text)
    result = orion("run", pipeline)
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("orion: error: step 'broken' (shard) failed: ") and "nowhere" in message
    assert "Traceback" not in result.stderr
    assert (Path("outputs/small/sharded") / "shard_manifest.json").is_file()
    assert Registry("models.json").get("small")
    assert not Path("outputs/small/never").exists()


def test_set_overrides_a_variable(orion, tiny_llama, tmp_path):
    pipeline = write(tmp_path / "p.yaml", SHARD_AND_REGISTER.format(model="not-used"))
    result = orion("run", pipeline, "--set", f"model={tiny_llama}", "--set", "out=elsewhere", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["steps"][0]["detail"]["model"] == str(tiny_llama)
    assert result.json()["steps"][0]["output"] == "elsewhere/sharded"


@pytest.mark.parametrize(
    ("args", "edit", "expected"),
    [
        (["--set", "colour=blue"], None, "--set colour=blue: the pipeline declares no variable 'colour'"),
        (["--set", "model"], None, "--set 'model': write NAME=VALUE"),
        ([], ("${steps.split.output}", "${steps.later.output}"), "step 'publish': unknown reference ${steps.later.output}"),
        ([], ("${vars.out}/sharded", "${vars.nope}/sharded"), "step 'split': unknown reference ${vars.nope}"),
        ([], ("shards: 2", "shards: 2, colour: blue"), "key 'shard.colour': unknown key"),
        ([], ("shards: 2", "shards: 0"), "step 'split': key 'shard.shards': Input should be greater than or equal to 1"),
        ([], ("key: small", "key: small, colour: blue"), "step 'publish': key 'register.colour': unknown key"),
        ([], ("key: small", "key: [small]"), "step 'publish': key 'register.key': Input should be a valid string"),
        ([], ("shards: 2", "max_shard_size: 1MB, shards: 2"), "give exactly one of shards or max_shard_size"),
        ([], ("shards: 2", "max_shard_size: 5XB"), "step 'split': key 'shard.max_shard_size': not a size"),
        ([], ("register:", "publish:"), "key 'publish': unknown key (step kinds: merge, quantize, shard, register, serve)"),
        ([], ("id: publish", "id: split"), "step id 'split' is used twice"),
        ([], ("pipeline: small", "pipelines: small"), "key 'pipelines': unknown key"),
    ],
)
def test_bad_pipelines_are_refused_before_anything_runs(orion, tiny_llama, tmp_path, args, edit, expected):
    text = SHARD_AND_REGISTER.format(model=tiny_llama)
    if edit:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1], 1)
    pipeline = write(tmp_path / "p.yaml", text)
    result = orion("run", pipeline, *args)
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not Path("outputs").exists() and not Path("models.json").exists()


def test_serve_must_be_the_last_step(orion, tiny_llama, tmp_path):
    text = SHARD_AND_REGISTER.format(model=tiny_llama).replace(
        "steps:\n", 'steps:\n  - id: live\n    serve: {model: "${vars.model}", tp: 1}\n')
    result = orion("run", write(tmp_path / "p.yaml", text))
    assert result.exit_code == 2
    assert "step 'live': serve can only be the last step" in result.stderr


def test_a_missing_pipeline_file_is_named(orion):
    result = orion("run", "nowhere.yaml")
    assert result.exit_code == 2
    assert "pipeline file nowhere.yaml: no such file" in result.stderr


# -- every shipped pipeline, on tiny models -------------------------------------------


def shipped_run(orion, name: str, *sets: str):
    result = orion("run", configs_dir() / name, *[a for s in sets for a in ("--set", s)], "--json")
    assert result.exit_code == 0, result.stderr
    return result.json()


def check_production_layout(out: Path) -> None:
    manifest = json.loads((out / "shard_manifest.json").read_text())
    assert len(manifest["shards"]) == 4
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["provenance"]["operation"] == "shard"


def quantized_generates(model_dir: Path) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = ORTModelForCausalLM.from_pretrained(model_dir)
    out = model.generate(**tokenizer("def f", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 2


@pytest.mark.slow
def test_shipped_production_pipeline(orion, tiny_llama):
    summary = shipped_run(orion, "pipeline.yaml", f"model={tiny_llama}", "out=prod", "key=tiny-prod")
    assert [(s["id"], s["action"]) for s in summary["steps"]] == [("quantize", "run"), ("shard", "run"), ("register", "run")]
    check_production_layout(Path("prod/production"))
    quantized_generates(Path("prod/quantized/quantized"))
    entry = Registry("models.json").get("tiny-prod")
    assert entry["format"] == "onnx" and entry["quantization"]["level"] == "q4"
    again = shipped_run(orion, "pipeline.yaml", f"model={tiny_llama}", "out=prod", "key=tiny-prod")
    assert [s["action"] for s in again["steps"]] == ["skip", "skip", "skip"]


@pytest.mark.slow
def test_shipped_optimize_workflow(orion, tiny_models):
    summary = shipped_run(orion, "workflows/optimize.yaml", f"model={tiny_models['qwen2']}", "out=opt")
    assert [s["action"] for s in summary["steps"]] == ["run", "run"]
    check_production_layout(Path("opt/production"))


@pytest.mark.slow
def test_shipped_specialize_workflow(orion, tiny_llama, tmp_path):
    specialist = build_tiny_model("llama", tmp_path / "specialist", seed=7)
    summary = shipped_run(orion, "workflows/specialize.yaml", f"general={tiny_llama}", f"specialist={specialist}",
                          "out=spec")
    assert [s["id"] for s in summary["steps"]] == ["merge", "quantize", "shard"]
    merged = json.loads(Path("spec/merged/metadata.json").read_text())["provenance"]
    assert merged["operation"] == "merge" and merged["parameters"]["method"] == "slerp"
    assert merged["parameters"]["t"] == pytest.approx(0.4)
    check_production_layout(Path("spec/production"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_serve_step_keeps_the_onnx_export_in_the_configured_cache(tiny_llama, tmp_path):
    """The step passes the resolved config's cache_dir (here from ORION_CACHE_DIR) to serve, not the default."""
    import glob
    import os
    import signal
    import subprocess
    import sys
    import time

    pipeline = write(tmp_path / "p.yaml", f"pipeline: live\nsteps:\n  - id: live\n    serve: "
                                          f"{{model: \"{tiny_llama}\", engine: onnxruntime, port: 0}}\n")
    env = {**os.environ, "ORION_CACHE_DIR": str(tmp_path / "configured"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "run", str(pipeline)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not glob.glob(str(tmp_path / "configured" / "onnx" / "*" / "orion-export.json")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "no export appeared in the configured cache"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    assert not (tmp_path / "xdg" / "orion" / "onnx").exists()
