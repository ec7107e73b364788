"""orion quantize on real exports: every architecture in the tiny-model table, the CLI end to end, memory.

Each test exports, quantizes and runs the result in onnxruntime; nothing is
mocked. The architecture table is tiny_models.TINY: a new line there is a
new case here, unless QUANTIZE_EXCLUDED says why not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from orion_cli.onnx_decoder import OnnxDecoder
from orion_cli.onnx_export.graph import EXPERT_COUNTS
from orion_cli.quantize import quantize_model
from orion_cli.registry import Registry
from tiny_models import (ARCHITECTURES, build_model, build_tiny_model, cohere2_config, jetmoe_config,
                         mamba_config)

pytestmark = pytest.mark.slow

QUANTIZE_EXCLUDED = {
    # the same modules as their base architecture; rope scaling is the server's concern (test_serve_model)
    "llama-rope-llama3": "rope variant of llama",
    "qwen2-rope-yarn": "rope variant of qwen2",
    "phi3-rope-longrope": "rope variant of phi3",
}
QUANTIZE_ARCHITECTURES = [a for a in ARCHITECTURES if a not in QUANTIZE_EXCLUDED]
# Wider than transformers' 0.02, so a wrong weight shows: a model of another seed is ~0.6 nats away at this
# scale, q4 ~0.02. (The session's tiny models use 0.2, where a random net is chaotic and even q4 moves
# its distribution by 0.3 nats.)
INIT_RANGE = 0.1
# PhiMoE's sparsemixer weighs each token's two experts nearly one-hot, so an expert choice q4's noise flips
# replaces that token's whole MLP output: at 0.1 q4 moves the random model 0.085 nats (0.029 with two experts,
# which every token takes both of); at 0.05, 0.009
INIT_RANGES = {"phimoe": 0.05}
PROMPT = [5, 17, 42, 99, 7, 130, 64]


@pytest.fixture(scope="module")
def quantize_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize-models")
    return {arch: build_tiny_model(arch, root / arch, initializer_range=INIT_RANGES.get(arch, INIT_RANGE))
            for arch in QUANTIZE_ARCHITECTURES}


def float_weights_left(model_dir: Path) -> list[str]:
    """MatMul/Gemm nodes still reading a 2-D float initializer (directly or through a Transpose), MoE
    routers ([experts, hidden], kept in fp32 by design) aside."""
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    config = json.loads((model_dir / "config.json").read_text())
    experts = next((config[key] for key in EXPERT_COUNTS if config.get(key)), None)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    left = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            weight = node.input[1]
            if weight in producers and producers[weight].op_type == "Transpose":
                weight = producers[weight].input[0]
            if weight in inits and len(inits[weight].dims) == 2 and inits[weight].dims[0] != experts:
                left.append(node.name)
    return left


def optimum_generate(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(model_dir, provider="CPUExecutionProvider")
    assert model.use_cache, "the model must run with past key values"
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return out[0, len(prompt):].tolist()


def check_allocation(metadata: dict, level: str, measured: bool) -> None:
    """Every tensor in one of the level's formats; the files within the level's size budget, or, where even the
    cheapest formats do not fit (a tiny model is mostly graph), every tensor in its cheapest; with calibration,
    the KL of the embedding, every decoder layer and the head measured, none skipped."""
    from orion_cli.quantize.levels import LEVELS

    recipe, allocation = LEVELS[level], metadata["quantization"]["allocation"]
    formats = {(f.bits, f.block) for f in recipe.formats}
    tied = any("tied_to" in t for t in metadata["tensors"])  # then the head takes the embedding's formats
    for tensor in metadata["tensors"]:
        bits, block = tensor["bits"], tensor["block_size"]
        # GatherBlockQuantized: the largest block dividing the hidden size
        if tensor["role"] == "embedding" or (tied and tensor["role"] == "lm_head"):
            assert any(bits == b and block <= f for b, f in formats), tensor
        else:
            assert (bits, block) in formats, tensor
    budget = recipe.size_budget * metadata["sizes"]["fp32_bytes"]
    if allocation["within_budget"]:
        assert metadata["sizes"]["quantized_bytes"] <= budget
    else:
        assert allocation["raised"] == []
    if measured:
        sensitivity = allocation["sensitivity"]
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(metadata["provenance"]["sources"][0]["path"]).get_text_config()
        assert "not_measured" not in sensitivity, sensitivity
        expected = {"embedding"} | {f"layer {i}" for i in range(config.num_hidden_layers)}
        assert set(sensitivity["groups_kl"]) == expected
        assert all(kl > 0 for kl in sensitivity["groups_kl"].values()), sensitivity
        assert set(sensitivity["lm_head_kl"]) == {str(f) for f in recipe.formats}


def check_loads_and_generates(model_dir: Path) -> None:
    """optimum's ORTModelForCausalLM (which sizes its own first cache) generates what orion's runner does."""
    config = json.loads((model_dir / "config.json").read_text())
    eos = {config["eos_token_id"]} if isinstance(config["eos_token_id"], int) else set(config["eos_token_id"])
    tokens = optimum_generate(model_dir, PROMPT, 10)
    assert tokens, "generated nothing"
    expected = OnnxDecoder(model_dir / "model.onnx").greedy(PROMPT, 10, eos)
    assert [t for t in tokens if t not in eos] == expected
    check_static_cache_attention(model_dir, config)


# serve's rewrite keeps a model's exported attention only for these reasons
NO_POSITION_IDS = "the graph takes no position_ids"  # optimum's Gemma exports derive them from the cache's length
KEEPS_EXPORTED_ATTENTION = {
    "gemma": NO_POSITION_IDS, "gemma2": NO_POSITION_IDS, "gemma3_text": NO_POSITION_IDS,
    "gpt2": "positions that are not rotary", "opt": "positions that are not rotary",  # learned positions
    "deepseek_v2": "GroupQueryAttention takes one head size",  # keys of 32, values of 24
    "deepseek_v3": "GroupQueryAttention takes one head size",
}


def check_static_cache_attention(model_dir: Path, config: dict) -> None:
    """serve's GroupQueryAttention rewrite of this graph (serve/onnx_attention.py), the rotary embedding folded in
    (serve/onnx_rotary.py), scores what the exported graph scores, prompt and decode steps, or the model keeps its
    exported attention for a known reason."""
    from transformers import AutoConfig

    from orion_cli.serve.onnx_serving import onnx_runner
    from orion_cli.serve.onnx_static import StaticCacheRunner
    from serve_testing import kl_divergence

    text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    runner = onnx_runner(model_dir / "model.onnx", text_config, attention="auto", max_batch_size=2, max_model_len=64,
                         prefix_cache_bytes=0, recompute_at=None)
    if config["model_type"] in KEEPS_EXPORTED_ATTENTION:
        assert KEEPS_EXPORTED_ATTENTION[config["model_type"]] in runner.attention, runner.attention
        return
    assert isinstance(runner, StaticCacheRunner), runner.attention
    # every rewritten architecture's rotary embedding is transformers' rotate_half form, folded into the op
    assert runner.attention.endswith("rotary embedding folded in"), runner.attention
    exported = OnnxDecoder(model_dir / "model.onnx")
    reference, past = exported.run(np.array([PROMPT]), None, None, None)
    ours, _ = runner._prefill(1, PROMPT, every_position=True)  # slot 1: rows are slots
    steps = [(reference[0], ours)]
    runner._move(1, 0)
    for step, token in enumerate([3, 5, 7]):
        reference, past = exported.run(np.array([[token]]), None, None, past)
        steps.append((reference[0], runner._decode([[token]], [len(PROMPT) + step])))
    for reference, ours in steps:
        assert kl_divergence(reference, ours) < 1e-3


@pytest.mark.parametrize("arch", QUANTIZE_ARCHITECTURES)
def test_q4_is_close_to_fp32_and_generates_in_optimum(arch, quantize_models, tmp_path):
    result = quantize_model(quantize_models[arch], tmp_path / "q4", level="q4", test=True, eval_tokens=2048)
    quality, tensors = result.metadata["quality"], result.metadata["tensors"]
    assert quality["kl_divergence"] <= 0.05, quality
    assert quality["top1_agreement"] >= 0.5, quality
    assert float_weights_left(result.model_dir) == [], "linear layers left in fp32"
    assert {t["role"] for t in tensors} == {"embedding", "lm_head", "linear"}
    assert sum(t["role"] == "lm_head" for t in tensors) == 1, "tied or not, the head is quantized once"
    check_allocation(result.metadata, "q4", measured=True)
    assert (result.model_dir / "model.onnx_data").is_file() and not (result.output / "onnx").exists()
    check_loads_and_generates(result.model_dir)


# q3 and q2 take the same formats and differ only in budget: q2 on every architecture, q3 on one
@pytest.mark.parametrize("arch,level", [(arch, "q2") for arch in QUANTIZE_ARCHITECTURES] + [("llama", "q3")])
def test_q3_and_q2_generate_in_optimum(arch, level, quantize_models, tmp_path):
    from orion_cli.quantize.sensitivity import SAMPLE_WINDOWS

    result = quantize_model(quantize_models[arch], tmp_path / level, level=level, method="rtn")
    check_allocation(result.metadata, level, measured=False)  # a 64-wide head has no 2/128 format to measure
    # round-to-nearest needs no Hessians: only the sensitivity sample is calibrated (was all 8192 tokens)
    assert result.metadata["quantization"]["calibration"]["text"]["windows"] == SAMPLE_WINDOWS
    check_loads_and_generates(result.model_dir)


def test_a_tied_table_is_stored_once_and_the_model_fits_its_budget(tmp_path):
    """The bug this fixes: a tied model's table was quantized twice, as the embedding and as the head, so a
    model whose table is a large share of its weights (Qwen3-0.6B: 0.18x at q4) overran the 0.16x budget that
    counts the table once. Here the table is 60% of the weights: twice stored, even 4/64 everywhere is 0.22x."""
    model = build_tiny_model("llama-tied", tmp_path / "tied", vocab_size=8192, hidden_size=256,
                             intermediate_size=512, initializer_range=INIT_RANGE)
    result = quantize_model(model, tmp_path / "q4", level="q4", method="rtn")
    metadata = result.metadata
    assert metadata["quantization"]["allocation"]["within_budget"]
    assert metadata["quantization"]["allocation"]["tied_embedding"]
    assert metadata["sizes"]["quantized_bytes"] <= 0.16 * metadata["sizes"]["fp32_bytes"]
    tensors = {t["role"]: t for t in metadata["tensors"] if t["role"] != "linear"}
    assert tensors["embedding"]["tied_to"] == tensors["lm_head"]["name"] and tensors["embedding"]["bytes"] == 0
    assert (tensors["embedding"]["bits"], tensors["embedding"]["block_size"]) == \
        (tensors["lm_head"]["bits"], tensors["lm_head"]["block_size"])
    graph = onnx.load(str(result.model_dir / "model.onnx"), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert producers[gather.input[0]].op_type == "Reshape" and producers[gather.input[0]].input[0] == head.input[1]
    assert gather.input[2:] == head.input[2:4]
    assert len(graph.initializer) == len({i.name for i in graph.initializer})
    check_loads_and_generates(result.model_dir)


def test_experts_of_a_block_not_made_traceable_are_refused(monkeypatch):
    """Exported as a plain decoder, an MoE block's routing would be fixed to the trace's shapes: experts are
    exported only through a block onnx_export/experts.py lists (here Mixtral's, taken off the list)."""
    from transformers import AutoModelForCausalLM

    from orion_cli.onnx_export import experts
    from orion_cli.onnx_export.graph import generic_decoder_config
    from tiny_models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    assert generic_decoder_config(model)[0] is not None
    monkeypatch.setattr(experts, "TRACEABLE_BLOCKS", {})
    constructor, why_not = generic_decoder_config(model)
    assert constructor is None and "experts (num_local_experts=4)" in why_not, why_not


@pytest.mark.parametrize("config, arch, reason", [
    (mamba_config, "MambaForCausalLM", "not a standard decoder"),
    (jetmoe_config, "JetMoeForCausalLM", "experts (num_local_experts=4) of a block orion has not made"),
])
def test_what_cannot_be_exported_fails_at_the_export_with_its_reason(orion, tmp_path, config, arch, reason):
    """optimum-onnx 0.1.0 has no entry for either. Mamba has no key/value cache, so it is no standard decoder;
    JetMoE is one, but its experts' block splits rows by the routing's counts in Python, which no trace keeps."""
    model = build_model(config(), tmp_path / "model")
    result = orion("quantize", "--model", model, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert f"optimum cannot export {arch}" in result.stderr and "not supported" in result.stderr
    assert reason in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and " Only [" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_transformers_does_not_know_is_refused_in_one_line(orion, tiny_llama, tmp_path):
    model = tmp_path / "unknown"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["NoSuchLM"]}))
    (model / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    result = orion("quantize", "--model", model, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert "no-such-model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


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
    assert (out / "quantized" / "model.onnx").is_file() and (out / "quantized" / "model.onnx_data").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "quantized" / name).is_file(), name
    assert (out / "onnx" / "model.onnx").is_file(), "--keep-intermediate keeps the fp32 model"
    assert not (out / ".scratch").exists() and not (out / "quantized" / ".scratch").exists()

    metadata = json.loads((out / "metadata.json").read_text())
    quant = metadata["quantization"]
    assert (quant["level"], quant["method"], quant["block_size"]) == ("q4", "gptq", 64)
    assert 4.0 <= quant["bits"] <= 8.0
    assert quant["embedding_method"] == "kquant"
    assert quant["calibration"]["tokens"] == quant["calibration"]["text"]["tokens"] > 0
    source = metadata["provenance"]["sources"][0]
    from orion_cli.modeldir import inspect_model_dir, weights_digest

    assert source["sha256"] == weights_digest(inspect_model_dir(tiny_models["llama"]))[0]
    assert metadata["provenance"]["operation"] == "quantize"
    assert all(t["bits"] in (4, 8) and t["bytes"] > 0 for t in metadata["tensors"])
    sizes = metadata["sizes"]
    assert sizes["quantized_bytes"] == sum(f["bytes"] for f in metadata["files"] if ".onnx" in f["path"])
    assert sizes["reduction_percent"] == pytest.approx(100 * (1 - sizes["quantized_bytes"] / sizes["source_bytes"]), abs=1e-3)
    assert {"export", "quantize", "check", "evaluate", "total"} <= set(metadata["durations"])
    assert {"onnxruntime", "optimum", "transformers", "torch"} <= set(metadata["tools"])

    entry = Registry(registry).get("tiny-q4")
    assert entry["quantization"] == {"level": "q4", "bits": quant["bits"], "method": "gptq", "block_size": 64}
    assert entry["format"] == "onnx"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_cli_test_figures_are_measured_against_fp32(cli_run, tiny_models):
    """The KL the command reports, recomputed from transformers' own model and the quantized file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orion_cli.quantize.evaluate import token_windows
    from orion_cli.reference.corpus import corpus_text

    result, out, _ = cli_run
    quality = result.json()["quality"]
    assert quality == json.loads((out / "metadata.json").read_text())["quality"]
    assert quality["tokens"] == quality["eval"]["tokens"] > 0
    assert quality["kl_divergence"] > 0 and 0 < quality["top1_agreement"] < 1
    assert quality["perplexity_change"] == pytest.approx(quality["perplexity"] / quality["perplexity_fp32"] - 1, abs=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(out / "quantized")
    windows = token_windows(tokenizer, corpus_text("heldout", 8192 * 8), 128, quality["eval"]["windows"])
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    fp32_onnx, q4 = OnnxDecoder(out / "onnx" / "model.onnx"), OnnxDecoder(out / "quantized" / "model.onnx")
    kl = []
    for batch in np.array_split(windows, max(1, len(windows) // 8)):
        with torch.no_grad():
            reference = hf(torch.from_numpy(batch[:, :-1])).logits.numpy()
        # --keep-intermediate's fp32 graph computes transformers' logits
        np.testing.assert_allclose(fp32_onnx.logits(batch[:, :-1]), reference, atol=2e-4)
        lp, lq = log_softmax(reference), log_softmax(q4.logits(batch[:, :-1]))
        kl.append((np.exp(lp) * (lp - lq)).sum(-1).ravel())
    assert np.concatenate(kl).mean() == pytest.approx(quality["kl_divergence"], rel=1e-3)
    completion = quality["completion"]
    assert completion["fp32"] and completion["quantized"]


def test_low_cpu_mem_is_accepted_and_changes_nothing(tiny_models, tmp_path):
    plain = quantize_model(tiny_models["llama"], tmp_path / "plain", level="q2", method="rtn")
    low = quantize_model(tiny_models["llama"], tmp_path / "low", level="q2", method="rtn", low_cpu_mem=True)
    for name in ("model.onnx", "model.onnx_data"):
        assert (plain.model_dir / name).read_bytes() == (low.model_dir / name).read_bytes(), name


def test_a_failure_midway_leaves_no_output(orion, tiny_models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_models["llama"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    # sound safetensors of the wrong shapes: it passes the cheap checks and fails while quantizing
    wider = build_tiny_model("llama", tmp_path / "wider", hidden_size=96)
    (broken / "model.safetensors").write_bytes((wider / "model.safetensors").read_bytes())
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    result = orion("quantize", "--model", broken, "--output", outputs / "q4", "--method", "rtn")
    assert result.exit_code == 1
    assert "shape" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(outputs.iterdir()) == [], "no output and no temporary sibling"


def test_eval_text_calibrates_and_evaluates_on_disjoint_windows(tiny_models, tmp_path):
    from orion_cli.reference.corpus import corpus_text

    text = tmp_path / "eval.txt"
    text.write_text(corpus_text("heldout", 120_000))
    result = quantize_model(tiny_models["llama"], tmp_path / "out", level="q4", test=True, eval_text=str(text),
                            calibration_tokens=1024, eval_tokens=1024)
    quant, quality = result.metadata["quantization"], result.metadata["quality"]
    assert quant["calibration"]["text"] == {"source": str(text), "windows": 8, "tokens": 1024}
    assert quality["eval"] == {"source": str(text), "windows": 8, "tokens": 1024}


def test_q3_on_the_reference_model_keeps_its_quality(reference_model, tmp_path):
    result = quantize_model(reference_model, tmp_path / "ref-q3", level="q3", test=True,
                            calibration_tokens=2048, eval_tokens=4096)
    quant, quality, sizes = result.metadata["quantization"], result.metadata["quality"], result.metadata["sizes"]
    check_allocation(result.metadata, "q3", measured=True)
    assert set(quant["bits_histogram"]) == {"2", "4"}
    assert quant["allocation"]["within_budget"] and quant["allocation"]["raised"], "some tensors were given 4 bits"
    assert sizes["quantized_bytes"] <= 0.13 * sizes["fp32_bytes"]
    assert quality["perplexity_change"] < 0.05
    assert quality["top1_agreement"] > 0.9


def test_q2_spends_its_budget_where_the_measured_kl_is(reference_model, tmp_path, monkeypatch):
    """The bug this fixes: q2 was 2 bits everywhere, and q3's allocation ranked tensors by relative output
    error, which calls the LM head (0.6% of its output) one of the least sensitive tensors when it costs the
    most perplexity. With the same bytes as uniform 2 bits in blocks of 64 plus what the budget leaves, the
    measured allocation must lower the KL divergence, and the head and embedding are what it raises first."""
    from orion_cli.quantize import levels

    common = dict(level="q2", test=True, calibration_tokens=2048, eval_tokens=4096)
    measured = quantize_model(reference_model, tmp_path / "measured", **common)
    check_allocation(measured.metadata, "q2", measured=True)
    larger = quantize_model(reference_model, tmp_path / "larger", **common, size_budget=0.125)
    monkeypatch.setitem(levels.LEVELS, "q2", levels.Level("q2", (levels.Format(2, 64),), 0.10, "uniform"))
    uniform = quantize_model(reference_model, tmp_path / "uniform", **common)
    sizes = measured.metadata["sizes"]
    assert measured.metadata["quantization"]["allocation"]["within_budget"]
    assert sizes["quantized_bytes"] <= 0.10 * sizes["fp32_bytes"]
    assert measured.metadata["quality"]["kl_divergence"] < 0.8 * uniform.metadata["quality"]["kl_divergence"]
    head_and_embedding = {t["name"]: t for t in measured.metadata["tensors"] if t["role"] != "linear"}
    assert any(t["bits"] == 4 for t in head_and_embedding.values()), head_and_embedding
    # a larger --size-budget buys more: the budget is the user's to set
    assert larger.metadata["quantization"]["allocation"]["size_budget"] == 0.125
    assert larger.metadata["sizes"]["quantized_bytes"] <= 0.125 * sizes["fp32_bytes"]
    assert larger.metadata["quality"]["kl_divergence"] < measured.metadata["quality"]["kl_divergence"]


# --- memory: bounded by a layer, not the model -------------------------------------------------------------

DEEP = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
            tie_word_embeddings=False)


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """The same layers, 12 deep (~300 MB of fp32 weights) and 3 deep: the whole process tree's sampled peak
    differs by less than 1.2x, with the default method (GPTQ, calibration a layer at a time)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from measure import run_measured

    peaks = {}
    for layers in (3, 12):
        model = build_tiny_model("llama", tmp_path / f"deep-{layers}", num_hidden_layers=layers, **DEEP)
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        command = [sys.executable, "-m", "orion_cli", "quantize", "--model", model, "--output", tmp_path / f"q4-{layers}",
                   "--calibration-tokens", "512"]
        measured = run_measured(command, interval=0.02)
        assert measured.returncode == 0, measured.stderr[-2000:]
        peaks[layers] = (measured.peak_bytes, weights)
    (deep_peak, deep_weights), (shallow_peak, _) = peaks[12], peaks[3]
    assert deep_weights >= 200e6
    assert deep_peak <= 1.2 * shallow_peak, {k: (round(p / 2**20), round(w / 2**20)) for k, (p, w) in peaks.items()}


def test_a_failed_export_keeps_stdout_one_json_document(tmp_path):
    """torch's exporter prints the whole IR graph to the process's stdout (C++) when it fails: 128 KB ahead of
    the --json document before, which no pipeline could parse."""
    from conftest import orion_process

    model = build_model(cohere2_config(), tmp_path / "cohere2")
    result = orion_process("quantize", "--model", model, "--output", tmp_path / "out", "--json",
                           env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert "ONNX export failed" in document["error"]["message"], document
    assert "Torch IR graph" in result.stderr
