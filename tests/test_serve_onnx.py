"""orion serve on a quantized ONNX directory: onnxruntime in one process, behind the same API.

The model is the tiny Llama exported here with optimum and quantized to 4 bits
with onnxruntime's MatMulNBits quantizer, laid out as `orion quantize` writes
it (OUT/quantized/model.onnx with external data), registered, and served by
its registry key.
"""

from __future__ import annotations

import os
import shutil
import threading

import httpx
import pytest

from orion_cli.registry import register_model
from server_process import serving

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

PROMPTS = ["def main():\n    return", "import os\nimport", "x", "class A:"]


@pytest.fixture(scope="module")
def quantized_dir(tiny_llama, tmp_path_factory):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("onnx")
    exported, out = root / "fp32", root / "tiny-q4"
    main_export(str(tiny_llama), output=exported, task="text-generation-with-past", do_validation=False)
    (out / "quantized").mkdir(parents=True)
    for name in os.listdir(exported):
        if name != "model.onnx":
            shutil.copy(exported / name, out / "quantized" / name)
    quantizer = MatMulNBitsQuantizer(onnx.load(exported / "model.onnx"), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out / "quantized" / "model.onnx"), use_external_data_format=True)
    return out


# auto: GroupQueryAttention over a static KV cache (serve/onnx_static.py); exported: the graph's own attention,
# as models the rewrite does not recognize are served (serve/onnx_engine.py)
@pytest.fixture(scope="module", params=["auto", "exported"])
def server(request, quantized_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-onnx")
    register_model(quantized_dir, "tiny-q4", work / "models.json")
    with serving("tiny-q4", "--port", "0", "--onnx-attention", request.param, cwd=work) as process:
        process.attention = request.param
        yield process


def ort_greedy(model_dir, prompt: str, max_new_tokens: int) -> list[int]:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = ORTModelForCausalLM.from_pretrained(model_dir)
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return out[: out.index(eos)] if eos in out else out


def test_concurrent_greedy_output_equals_onnxruntime_generate(server, quantized_dir):
    """Requests of different lengths: the batch kept between steps is split and re-formed as each one ends."""
    assert server.ready["engine"] == "onnxruntime"
    lengths = [5, 16, 9, 12]
    expected = [ort_greedy(quantized_dir / "quantized", p, n) for p, n in zip(PROMPTS, lengths)]
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny-q4", "prompt": PROMPTS[i], "max_tokens": lengths[i], "temperature": 0,
            "return_token_ids": True})
        results[i] = response.json()["choices"][0]["token_ids"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected


def test_models_endpoint_shows_the_registry_entry(server):
    card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == "tiny-q4"
    assert card["orion"]["engine"] == "onnxruntime"
    expected = "GroupQueryAttention, static KV cache" if server.attention == "auto" else "exported (--onnx-attention"
    assert card["orion"]["attention"].startswith(expected)
    assert card["orion"]["registry"]["format"] == "onnx"
    assert card["orion"]["registry"]["id"] == "tiny-q4"


def test_openai_client_streams_chat(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny-q4", messages=messages, max_tokens=10, temperature=0)
    parts = client.chat.completions.create(model="tiny-q4", messages=messages, max_tokens=10, temperature=0,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole.choices[0].message.content


def test_tensor_parallelism_does_not_apply_to_the_onnxruntime_engine(orion, quantized_dir):
    result = orion("serve", quantized_dir, "--tp", "2", "--engine", "onnxruntime")
    assert result.exit_code == 2
    assert "--tp: the onnxruntime engine serves" in result.stderr
    assert "use --engine torch" in result.stderr


def test_the_torch_engine_refuses_onnx_models_orion_did_not_quantize(orion, quantized_dir):
    """onnxruntime's own quantizer names weights after graph nodes: nothing says which checkpoint tensor each is."""
    result = orion("serve", quantized_dir, "--tp", "2")
    assert result.exit_code == 2
    assert "was not quantized by orion quantize" in result.stderr and "--engine onnxruntime" in result.stderr


def test_echo_scores_the_prompt_with_the_onnx_models_logits(server, quantized_dir, tiny_llama):
    import numpy as np

    from orion_cli.onnx_decoder import OnnxDecoder
    from serve_testing import tokenize

    ids = tokenize(tiny_llama, PROMPTS[0] + " 42")
    logits, _ = OnnxDecoder(quantized_dir / "quantized" / "model.onnx").run(np.array([ids]), None, None, None)
    shifted = logits[0].astype(np.float64)
    reference = shifted - np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - shifted.max(-1, keepdims=True)
    response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "tiny-q4", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2})
    scored = response.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    assert max(abs(scored[i] - reference[i - 1, ids[i]]) for i in range(1, len(ids))) < 1e-4


def test_a_prompt_that_starts_like_an_earlier_one_prefills_only_the_rest(server, quantized_dir, tiny_llama):
    """The prefix cache: the same tokens as generate() without one, and /metrics counts what was reused."""
    from serve_testing import metric, tokenize

    first = "def prefix_cache_probe(rows):\n    total = 0\n    for row in rows:"
    longer = first + "\n        total +="
    outputs, hits, queries = [], [], []
    for prompt in (first, first, longer):
        before = (metric(server.url, "vllm:prefix_cache_hits_total") or 0.0,
                  metric(server.url, "vllm:prefix_cache_queries_total") or 0.0)
        response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny-q4", "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
        outputs.append(response.json()["choices"][0]["token_ids"])
        hits.append(metric(server.url, "vllm:prefix_cache_hits_total") - before[0])
        queries.append(metric(server.url, "vllm:prefix_cache_queries_total") - before[1])
    assert outputs == [ort_greedy(quantized_dir / "quantized", p, 8) for p in (first, first, longer)]
    first_ids, longer_ids = tokenize(tiny_llama, first), tokenize(tiny_llama, longer)
    shared = next(i for i, (a, b) in enumerate(zip(first_ids + [-1], longer_ids)) if a != b)
    assert queries == [len(first_ids), len(first_ids), len(longer_ids)]
    # the repeat reuses all but its last token; the longer prompt its shared start with the first
    assert hits[1:] == [len(first_ids) - 1, shared]


def test_the_static_cache_grows_and_keeps_each_rows_positions(quantized_dir):
    """Two requests of different lengths, the longer past the first capacity (256 positions, doubled to 512),
    decoded together: each row scores what the exported graph scores for it alone."""
    import numpy as np
    from transformers import AutoConfig

    from orion_cli.onnx_decoder import OnnxDecoder
    from orion_cli.serve.attention import CACHE_GROWTH_START
    from orion_cli.serve.onnx_serving import onnx_runner
    from orion_cli.serve.onnx_static import StaticCacheRunner
    from serve_testing import kl_divergence

    graph = quantized_dir / "quantized" / "model.onnx"
    config = AutoConfig.from_pretrained(quantized_dir / "quantized").get_text_config()
    runner = onnx_runner(graph, config, attention="auto", max_batch_size=2, max_model_len=600, prefix_cache_bytes=0,
                         recompute_at=None)
    assert isinstance(runner, StaticCacheRunner)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, 9).tolist(), rng.integers(1, 200, CACHE_GROWTH_START + 40).tolist()]
    exported = OnnxDecoder(graph)
    pasts = []
    for slot, prompt in enumerate(prompts):
        ours, _ = runner._prefill(slot, prompt, every_position=True)
        reference, past = exported.run(np.array([prompt]), None, None, None)
        pasts.append(past)
        assert kl_divergence(reference[0], ours) < 1e-3
    assert runner.capacity == 2 * CACHE_GROWTH_START
    for step, tokens in enumerate([[3], [5]] for _ in range(3)):
        ours = runner._decode(tokens, [len(p) + step for p in prompts])
        for row, prompt in enumerate(prompts):
            reference, pasts[row] = exported.run(np.array([tokens[row]]), None, None, pasts[row])
            assert kl_divergence(reference[0], ours[row:row + 1]) < 1e-3


def test_decode_steps_bound_once_follow_the_cache_when_it_grows_under_them(quantized_dir):
    """A decode step's IO binding is made once per row count and reused; when the cache outgrows its capacity in
    the middle of decoding, the next steps bind the new buffers and still score what the exported graph does."""
    import numpy as np
    from transformers import AutoConfig

    from orion_cli.onnx_decoder import OnnxDecoder
    from orion_cli.serve.attention import CACHE_GROWTH_START
    from orion_cli.serve.onnx_serving import onnx_runner
    from serve_testing import kl_divergence

    graph = quantized_dir / "quantized" / "model.onnx"
    config = AutoConfig.from_pretrained(quantized_dir / "quantized").get_text_config()
    runner = onnx_runner(graph, config, attention="auto", max_batch_size=2, max_model_len=600, prefix_cache_bytes=0,
                         recompute_at=None)
    prompt = np.random.default_rng(1).integers(1, 200, CACHE_GROWTH_START - 2).tolist()
    runner._prefill(0, prompt, every_position=False)
    exported = OnnxDecoder(graph)
    _, past = exported.run(np.array([prompt]), None, None, None)
    for step, token in enumerate([7, 11, 13, 17]):  # positions 254..257: the capacity doubles at 256
        ours = runner._decode([[token]], [len(prompt) + step])
        reference, past = exported.run(np.array([[token]]), None, None, past)
        assert kl_divergence(reference[0], ours) < 1e-3, f"step {step}, capacity {runner.capacity}"
    assert runner.capacity == 2 * CACHE_GROWTH_START


def test_the_rewrite_feeds_each_projection_to_attention_whole_and_unrotated(quantized_dir):
    """On a Llama graph the op reads q_proj, k_proj and v_proj's outputs as they are: the split into heads, its
    undoing and the rotary embedding are all gone from the path (GroupQueryAttention rotates)."""
    import onnx
    from transformers import AutoConfig

    from orion_cli.serve.onnx_attention import Heads, rewrite_attention

    config = AutoConfig.from_pretrained(quantized_dir / "quantized").get_text_config()
    heads = Heads(config.num_attention_heads, config.num_key_value_heads,
                  config.hidden_size // config.num_attention_heads)
    graph = onnx.load(quantized_dir / "quantized" / "model.onnx", load_external_data=False)
    rewritten = rewrite_attention(graph, heads, rotary_positions=64)
    producer = {out: node for node in rewritten.graph.node for out in node.output}
    attention = [node for node in rewritten.graph.node if node.op_type == "GroupQueryAttention"]
    assert len(attention) == config.num_hidden_layers
    for node in attention:
        assert [producer[name].name.rsplit("/", 2)[-2] for name in node.input[:3]] == ["q_proj", "k_proj", "v_proj"]
        assert {a.name: a.i for a in node.attribute}["do_rotary"] == 1
        assert len(node.input) == 9  # the cos and sin tables
    assert not any(node.op_type in ("Neg", "Sin", "Cos") for node in rewritten.graph.node)


def test_a_rewritten_graph_onnxruntime_refuses_falls_back_to_the_exported_attention(quantized_dir):
    """A config that misstates the attention heads (the cache's heads and head size are the graph's own): the
    rewritten node does not fit the graph, the load-time probe fails, and the model is served with its exported
    attention, saying why."""
    from transformers import AutoConfig

    from orion_cli.serve.onnx_engine import OnnxRunner
    from orion_cli.serve.onnx_serving import onnx_runner
    from orion_cli.serve.onnx_static import StaticCacheRunner

    config = AutoConfig.from_pretrained(quantized_dir / "quantized").get_text_config()
    config.num_attention_heads *= 2
    runner = onnx_runner(quantized_dir / "quantized" / "model.onnx", config, attention="auto", max_batch_size=2,
                         max_model_len=64, prefix_cache_bytes=0, recompute_at=None)
    assert isinstance(runner, OnnxRunner) and not isinstance(runner, StaticCacheRunner)
    assert runner.attention.startswith("exported (onnxruntime refused the rewritten graph: ")


def test_models_without_rotary_positions_keep_their_exported_attention(quantized_dir):
    """The rewrite replaces the graph's mask with the op's causal one; an ALiBi bias would ride on that mask."""
    from transformers import AutoConfig

    from orion_cli.serve.onnx_serving import onnx_runner
    from orion_cli.serve.onnx_static import StaticCacheRunner

    config = AutoConfig.from_pretrained(quantized_dir / "quantized").get_text_config()
    config.alibi = True  # as Falcon's configs say it
    runner = onnx_runner(quantized_dir / "quantized" / "model.onnx", config, attention="auto", max_batch_size=2,
                         max_model_len=64, prefix_cache_bytes=0, recompute_at=None)
    assert not isinstance(runner, StaticCacheRunner)
    assert runner.attention.startswith("exported (positions that are not rotary")


def test_a_graph_without_a_key_value_cache_is_refused_as_a_usage_error(orion, tiny_llama, tmp_path):
    from optimum.exporters.onnx import main_export

    main_export(str(tiny_llama), output=tmp_path / "no-past", task="text-generation", do_validation=False)
    result = orion("serve", tmp_path / "no-past", "--engine", "onnxruntime", "--port", "0")
    assert result.exit_code == 2, result.stderr
    assert "has no key/value cache inputs" in result.stderr and len(result.stderr.strip().splitlines()) == 1
