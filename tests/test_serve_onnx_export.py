"""`orion serve --engine onnxruntime` on a checkpoint: its fp32 ONNX export, made once into orion's cache.

Every architecture of the tiny-model table is exported (onnx_export/float_model.py)
and must score a prompt as transformers does; one real server shows the cache
being filled, reused, and left untouched by refused requests.
"""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
import torch

from orion_cli.modeldir import inspect_model_dir
from orion_cli.onnx_decoder import OnnxDecoder
from orion_cli.onnx_export.float_model import export_float_model
from orion_cli.serve.onnx_cache import EXPORT_SUBDIR, RECORD_FILE, CacheSpaceError, check_free_space, float_model_for
from server_process import serving
from serve_testing import kl_divergence
from tiny_models import ARCHITECTURES, build_model, jetmoe_config

PROMPT = [5, 17, 42, 99, 7, 130, 64, 3, 250, 11]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_fp32_export_scores_a_prompt_as_transformers_does(arch, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "onnx"
    out.mkdir()
    export_float_model(tiny_models[arch], out)
    ours = OnnxDecoder(out / "model.onnx").logits(np.array([PROMPT]))[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([PROMPT])).logits[0].numpy()
    for position in range(len(PROMPT)):
        assert kl_divergence(reference[position], ours[position]) < 1e-5, position
    assert (reference.argmax(-1) == ours.argmax(-1)).all()


def test_the_export_fails_before_writing_when_the_disk_is_too_small(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CacheSpaceError, match=r"^cache_dir .*GiB free \(set cache_dir"):
        check_free_space(tmp_path / "onnx" / "model", free + 2**40, "the export")
    check_free_space(tmp_path / "onnx" / "model", 1, "the export")


def test_a_changed_checkpoint_gets_a_new_export(tiny_llama, tmp_path):
    """The key covers the weight files' sizes and times: a checkpoint rewritten in place is exported again."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    first = float_model_for(inspect_model_dir(model), tmp_path / "cache")
    assert float_model_for(inspect_model_dir(model), tmp_path / "cache").path == first.path
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new modification time
    second = float_model_for(inspect_model_dir(model), tmp_path / "cache")
    assert second.path != first.path and (second.path / RECORD_FILE).is_file()


def greedy_request(model_dir) -> tuple[dict, list[int]]:
    """A 12-token greedy completion request for the model, and the tokens transformers' generate() gives."""
    from transformers import AutoModelForCausalLM

    prompt = PROMPT[:6]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                              pad_token_id=0)[0, len(prompt):].tolist()
    body = {"model": model_dir.name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    return body, expected


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_checkpoint_is_served_by_onnxruntime_from_its_cached_export(tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    env = {"ORION_CACHE_DIR": str(cache)}
    body, expected = greedy_request(tiny_llama)
    with serving(tiny_llama, "--port", "0", "--engine", "onnxruntime",
                 env=env) as server:
        assert server.ready["engine"] == "onnxruntime"
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        exported = card["orion"]["onnx_export"]
        assert exported.startswith(str(cache / EXPORT_SUBDIR))
        assert card["root"] == str(tiny_llama.resolve())
        assert card["orion"]["attention"] == "GroupQueryAttention, static KV cache, rotary embedding folded in"
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["token_ids"] == expected
    record = json.loads((cache / EXPORT_SUBDIR / exported.rsplit("/", 1)[1] / RECORD_FILE).read_text())
    assert record["source"] == str(tiny_llama.resolve())
    data = cache / EXPORT_SUBDIR / exported.rsplit("/", 1)[1] / "model.onnx_data"
    written = data.stat().st_mtime_ns
    with serving(tiny_llama, "--port", "0", "--engine", "onnxruntime",
                 env=env) as server:  # a second start reuses the export
        assert any("serving the fp32 ONNX export in" in line for line in server.stderr_lines)
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["token_ids"] == expected
    assert data.stat().st_mtime_ns == written
    assert [p.name for p in (cache / EXPORT_SUBDIR).iterdir()] == [exported.rsplit("/", 1)[1]]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("arch", ["stablelm", "phimoe", "granitemoe"])
def test_an_architecture_the_torch_engine_cannot_run_is_served_by_onnxruntime(tiny_models, tmp_path, arch):
    """transformers' StableLM and PhiMoE take no attention function, so the torch engine cannot run them:
    `--engine auto` serves their export instead (a warning says so) and it answers what generate() does.
    StableLM's graph is the one whose attention scale comes from the query's shape, and whose rotary embedding
    turns 16 of 64 dims; PhiMoE's is a standard-decoder export with its experts made traceable, whose rotary
    tables are sized by the cache and the embeddings' shape (computed with the export's external weights)."""
    path = tiny_models[arch]
    body, expected = greedy_request(path)
    with serving(path, "--port", "0", env={"ORION_CACHE_DIR": str(tmp_path / "cache")}) as server:
        assert server.ready["engine"] == "onnxruntime"
        logged = " ".join(" ".join(server.stderr_lines).split())  # rich wraps a long record over lines
        assert "takes no attention function" in logged and "with onnxruntime instead" in logged, logged
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        assert card["orion"]["attention"] == "GroupQueryAttention, static KV cache, rotary embedding folded in"
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["token_ids"] == expected


@pytest.mark.slow
@pytest.mark.multiprocess
def test_keys_and_values_of_different_head_sizes_are_served_with_the_exported_attention(tiny_models, tmp_path):
    """DeepSeek's multi-head latent attention caches keys of 32 and values of 24 (the tiny table's). The rewrite
    keeps its exported attention, whose decode steps pad each past in its own shape: they padded the values to
    the keys' head size ("could not broadcast input array from shape (16,22,128) into shape (16,22,192)" on
    DeepSeek-V2-Lite's shapes), which failed the engine at the first decode step."""
    path = tiny_models["deepseek_v3"]
    body, expected = greedy_request(path)
    with serving(path, "--port", "0", "--engine", "onnxruntime",
                 env={"ORION_CACHE_DIR": str(tmp_path / "cache")}) as server:
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        assert card["orion"]["attention"].startswith("exported (keys of head size 32 and values of 24"), card
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["token_ids"] == expected


def test_what_onnxruntime_cannot_do_is_refused_before_any_export(orion, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ORION_CACHE_DIR", str(tmp_path / "cache"))
    result = orion("serve", tiny_llama, "--engine", "onnxruntime", "--tp", "2")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("orion: error: --tp: the onnxruntime engine serves")
    assert not (tmp_path / "cache").exists()


def test_an_architecture_no_export_takes_fails_in_one_line_and_leaves_no_export(orion, tmp_path, monkeypatch):
    monkeypatch.setenv("ORION_CACHE_DIR", str(tmp_path / "cache"))
    model = build_model(jetmoe_config(), tmp_path / "jetmoe")
    result = orion("serve", model, "--engine", "onnxruntime")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("orion: error:")]
    assert len(errors) == 1 and f"MODEL_DIR {model}: optimum cannot export" in errors[0], errors
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()
