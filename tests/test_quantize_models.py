"""orion quantize on real exports: every supported architecture, the CLI end to end, the reference model.

Each test exports with optimum, quantizes, and runs the result in onnxruntime;
nothing is mocked. Round-to-nearest is used where the algorithm does not
matter (it needs no calibration pass); the CLI test runs the default (GPTQ).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from orion_cli.quantize import quantize_model
from orion_cli.quantize.evaluate import OnnxLM
from orion_cli.registry import Registry
from tiny_models import build_tiny_model

pytestmark = pytest.mark.slow


def quantized_ops(model_dir: Path) -> tuple[dict[str, int], list[str]]:
    """Operator counts, and the float MatMul/Gemm/Gather nodes that still read a constant 2-D weight."""
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    counts: dict[str, int] = {}
    left: list[str] = []
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type in ("MatMul", "Gemm"):
            weight = node.input[1]
            if weight in producers and producers[weight].op_type == "Transpose":
                weight = producers[weight].input[0]
            if weight in inits and len(inits[weight].dims) == 2:
                left.append(node.name)
    return counts, left


def generate(model_dir: Path, max_new_tokens: int = 12) -> list[int]:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = ORTModelForCausalLM.from_pretrained(model_dir, provider="CPUExecutionProvider")
    assert model.use_cache, "the model must run with past key values"
    inputs = tokenizer("def main():\n    return", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gpt2"])
def test_every_architecture_quantizes_and_generates_with_kv_cache(arch, tiny_models, tmp_path):
    out = tmp_path / f"{arch}-q4"
    result = quantize_model(tiny_models[arch], out, level="q4", method="rtn")

    counts, float_weights = quantized_ops(out / "quantized")
    assert float_weights == [], f"linear layers left in fp32: {float_weights}"
    assert counts.get("GatherBlockQuantized") == 1, "the token embedding must be quantized"
    tensors = result.metadata["tensors"]
    assert {t["role"] for t in tensors} == {"embedding", "lm_head", "linear"}
    assert all(t["bits"] == 4 for t in tensors)
    # the LM head of tied models (qwen2, gpt2) reads a Transpose of the embedding; it is quantized too
    assert sum(t["role"] == "lm_head" for t in tensors) == 1

    tokens = generate(out / "quantized")
    assert len(tokens) == 12
    assert not (out / "onnx").exists()
    assert result.metadata["sizes"]["quantized_bytes"] < result.metadata["sizes"]["onnx_fp32_bytes"]


def test_unsupported_architecture_is_refused_before_any_work(orion, tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    save_file({"embeddings.word_embeddings.weight": torch.zeros(4, 4)}, model / "model.safetensors")
    result = orion("quantize", "--model", model, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert "BertForMaskedLM" in result.stderr and "not supported" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cli_run(tiny_models, tmp_path_factory):
    """orion quantize with its defaults (GPTQ), --test, --keep-intermediate and --register, run once."""
    from conftest import invoke

    root = tmp_path_factory.mktemp("cli")
    out, registry = root / "out", root / "models.json"
    result = invoke("quantize", "--model", tiny_models["llama"], "--output", out, "--test", "--keep-intermediate",
                    "--register", "tiny-q4", "--registry", registry, "--json")
    return result, out, registry


def test_cli_writes_the_layout_metadata_and_registry_entry(cli_run, tiny_models):
    result, out, registry = cli_run
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["output"] == str(out)
    assert (out / "quantized" / "model.onnx").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "quantized" / name).is_file(), name
    assert (out / "onnx" / "model.onnx").is_file(), "--keep-intermediate keeps the fp32 export"

    metadata = json.loads((out / "metadata.json").read_text())
    quant = metadata["quantization"]
    assert (quant["level"], quant["bits"], quant["method"], quant["block_size"]) == ("q4", 4.0, "gptq", 32)
    assert quant["embedding_method"] == "kquant"
    assert quant["calibration"]["tokens"] > 0
    source = metadata["provenance"]["sources"][0]
    from orion_cli.modeldir import inspect_model_dir, weights_digest

    assert source["sha256"] == weights_digest(inspect_model_dir(tiny_models["llama"]))[0]
    assert metadata["provenance"]["operation"] == "quantize"
    assert all(t["bits"] == 4 and t["bytes"] > 0 for t in metadata["tensors"])
    sizes = metadata["sizes"]
    assert sizes["quantized_bytes"] == sum(f["bytes"] for f in metadata["files"] if f["path"].endswith(".onnx"))
    assert sizes["reduction_percent"] == pytest.approx(100 * (1 - sizes["quantized_bytes"] / sizes["source_bytes"]), abs=1e-3)
    assert {"export", "quantize", "check", "evaluate", "total"} <= set(metadata["durations"])
    assert {"onnxruntime", "optimum", "transformers", "torch"} <= set(metadata["tools"])

    entry = Registry(registry).get("tiny-q4")
    assert entry["quantization"] == {"level": "q4", "bits": 4.0, "method": "gptq", "block_size": 32}
    assert entry["format"] == "onnx"


def test_cli_test_figures_are_measured_against_fp32(cli_run):
    result, out, _ = cli_run
    quality = result.json()["quality"]
    assert quality == json.loads((out / "metadata.json").read_text())["quality"]
    assert quality["tokens"] == quality["eval"]["tokens"] > 0
    assert quality["kl_divergence"] > 0
    assert 0 < quality["top1_agreement"] < 1
    assert quality["perplexity_change"] == pytest.approx(quality["perplexity"] / quality["perplexity_fp32"] - 1, abs=1e-5)

    # recompute the KL divergence from the two models on disk, independently of the command
    from orion_cli.reference.corpus import corpus_text
    from orion_cli.quantize.evaluate import token_windows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "quantized")
    windows = token_windows(tokenizer, corpus_text("heldout", 8192 * 8), 128, quality["eval"]["windows"])
    fp32, q4 = OnnxLM(out / "onnx" / "model.onnx"), OnnxLM(out / "quantized" / "model.onnx")
    kl = []
    for batch in np.array_split(windows, max(1, len(windows) // 8)):
        p = fp32.logits(batch[:, :-1]).astype(np.float64)
        q = q4.logits(batch[:, :-1]).astype(np.float64)
        lp = p - np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True)) - p.max(-1, keepdims=True)
        lq = q - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True)) - q.max(-1, keepdims=True)
        kl.append((np.exp(lp) * (lp - lq)).sum(-1).ravel())
    assert np.concatenate(kl).mean() == pytest.approx(quality["kl_divergence"], rel=1e-3)
    completion = quality["completion"]
    assert completion["fp32"] and completion["quantized"]


def test_low_cpu_mem_writes_external_data_and_computes_the_same_model(tiny_models, tmp_path):
    inline = quantize_model(tiny_models["llama"], tmp_path / "inline", level="q2", method="rtn")
    low = quantize_model(tiny_models["llama"], tmp_path / "low", level="q2", method="rtn", low_cpu_mem=True)
    assert (low.model_dir / "model.onnx_data").is_file()
    assert not (inline.model_dir / "model.onnx_data").exists()
    ids = np.arange(1, 17, dtype=np.int64).reshape(2, 8)
    np.testing.assert_array_equal(OnnxLM(inline.model_dir / "model.onnx").logits(ids),
                                  OnnxLM(low.model_dir / "model.onnx").logits(ids))
    assert low.metadata["sizes"]["quantized_bytes"] == pytest.approx(inline.metadata["sizes"]["quantized_bytes"], rel=0.05)
    assert len(generate(low.model_dir, 4)) == 4


def test_a_failure_midway_leaves_no_output(orion, tiny_models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_models["llama"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    # sound safetensors of the wrong shapes: it passes the cheap checks and fails the export
    wider = build_tiny_model("llama", tmp_path / "wider", hidden_size=96)
    (broken / "model.safetensors").write_bytes((wider / "model.safetensors").read_bytes())
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    result = orion("quantize", "--model", broken, "--output", outputs / "q4", "--method", "rtn")
    assert result.exit_code == 1
    assert "ONNX export failed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(outputs.iterdir()) == [], "no output and no temporary sibling"


def test_eval_text_calibrates_and_evaluates_on_disjoint_windows(tiny_models, tmp_path):
    from orion_cli.reference.corpus import corpus_text

    text = tmp_path / "eval.txt"
    text.write_text(corpus_text("heldout", 120_000))
    result = quantize_model(tiny_models["llama"], tmp_path / "out", level="q4", test=True, eval_text=str(text),
                            calibration_tokens=1024, eval_tokens=1024)
    quant, quality = result.metadata["quantization"], result.metadata["quality"]
    assert quant["calibration"] == {"source": str(text), "windows": 8, "tokens": 1024}
    assert quality["eval"] == {"source": str(text), "windows": 8, "tokens": 1024}


def test_q3_on_the_reference_model_keeps_its_quality(reference_model, tmp_path):
    result = quantize_model(reference_model, tmp_path / "ref-q3", level="q3", test=True,
                            calibration_tokens=2048, eval_tokens=4096)
    quant, quality, sizes = result.metadata["quantization"], result.metadata["quality"], result.metadata["sizes"]
    assert 2.7 <= quant["bits"] <= 3.0
    assert set(quant["bits_histogram"]) == {"2", "4"}
    assert quant["allocation"]["raised"], "some tensors were given 4 bits"
    assert sizes["reduction_percent"] >= 85.0
    assert quality["perplexity_change"] < 0.05
    assert quality["top1_agreement"] > 0.9
