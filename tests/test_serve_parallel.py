"""orion serve with tensor and pipeline parallelism, through real torchrun workers (gloo on CPU).

Greedy output equals transformers' generate() token for token at tp=2, pp=2
(unequal --pp-split) and tp=2 x pp=2; a two-node launch on this machine serves
tp=1 x pp=2 across two `orion serve` invocations; SIGTERM stops every rank.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest
import torch

from server_process import ServerProcess

from serve_testing import (assert_prompt_scoring_matches, eventually_metric, free_port, hf_greedy, hf_tokenizer,
                           metric, tokenize)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

PROMPTS = ["def main():\n    return", "import os\nimport", "x"]


def started(*args, cwd, env=None) -> ServerProcess:
    server = ServerProcess(*args, "--port", "0", "--max-model-len", "128", cwd=cwd, env=env).start()
    server.wait_ready()
    return server


def stopped_cleanly(server: ServerProcess) -> None:
    server.stop()
    leftovers = server.kill_leftovers()
    assert not leftovers, f"processes left behind: {leftovers}"


def completion(url: str, model: str, prompt: str, max_tokens: int, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            **extra}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def assert_greedy_matches(url: str, model: str, model_dir, prompts=PROMPTS, max_tokens: int = 12) -> None:
    for prompt in prompts:
        got = completion(url, model, prompt, max_tokens)["token_ids"]
        assert got == hf_greedy(model_dir, tokenize(model_dir, prompt), max_tokens), prompt


def assert_concurrent_clients_match(url: str, model: str, model_dir, clients: int = 4) -> None:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(clients)]
    lengths = [5 + 4 * i for i in range(clients)]
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = completion(url, model, prompts[i], lengths[i])["token_ids"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    want = [hf_greedy(model_dir, tokenize(model_dir, p), n) for p, n in zip(prompts, lengths)]
    assert [results.get(i) for i in range(clients)] == want


def test_tp2_matches_transformers_and_sigterm_stops_every_rank(tiny_models, tmp_path):
    model_dir = tiny_models["qwen2"]  # biases on q/k/v and tied embeddings, split two ways
    server = started(model_dir, "--tp", "2", cwd=tmp_path)
    try:
        ranks = server.ready["ranks"]
        assert [(r["stage"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1)]
        assert_greedy_matches(server.url, "qwen2", model_dir)
        assert_concurrent_clients_match(server.url, "qwen2", model_dir)
        assert_prompt_scoring_matches(server.url, "qwen2", model_dir)  # every position through the split head
        full = sum(t.numel() * t.element_size() for t in hf_model_parameters(model_dir))
        assert all(r["weight_bytes"] <= 0.6 * full for r in ranks)  # each rank holds about half
        # SIGTERM while a request is in flight: it is answered in full, then every rank stops
        body = {"model": "qwen2", "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            first = next(lines)
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        assert server.wait(90) == 0
        assert server.wait_event("stopped", 5)["drained"] is True
    finally:
        stopped_cleanly(server)


def test_pp2_with_an_uneven_split_matches_transformers(tiny_llama, tmp_path):
    model_dir = with_layers(tiny_llama, 3, tmp_path / "llama-3-layers")
    server = started(model_dir, "--pp", "2", "--pp-split", "1,2", "--activation-codec", "zstd", cwd=tmp_path,
                     env={"ORION_CODEC_AUTO_THRESHOLD_BYTES": "0"})
    try:
        ranks = server.ready["ranks"]
        assert [(r["stage"], r["tp_rank"]) for r in ranks] == [(0, 0), (1, 0)]
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        assert card["orion"]["layers_per_stage"] == [1, 2]
        assert_greedy_matches(server.url, "llama-3-layers", model_dir)
        assert_prompt_scoring_matches(server.url, "llama-3-layers", model_dir)  # scores travel back from stage 1
        sent = eventually_metric(server.url, "orion_codec_frames_total", codec="zstd", direction="encode", stage="0")
        received = eventually_metric(server.url, "orion_codec_frames_total", codec="zstd", direction="decode", stage="1")
        assert sent and sent == received
    finally:
        stopped_cleanly(server)


def test_tp2_by_pp2_matches_transformers(tiny_models, tmp_path):
    model_dir = tiny_models["phi3"]  # fused qkv_proj and gate_up_proj, split two ways in each of two stages
    server = started(model_dir, "--tp", "2", "--pp", "2", cwd=tmp_path)
    try:
        assert [(r["stage"], r["tp_rank"]) for r in server.ready["ranks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert_greedy_matches(server.url, "phi3", model_dir)
        assert_concurrent_clients_match(server.url, "phi3", model_dir, clients=3)
    finally:
        stopped_cleanly(server)


def test_two_nodes_on_this_machine_serve_one_stage_each(tiny_llama, tmp_path):
    port = free_port()
    common = ["--pp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
              "--activation-codec", "int8+zstd"]
    env = {"ORION_CODEC_AUTO_THRESHOLD_BYTES": "0"}
    node1 = ServerProcess(tiny_llama, *common, "--node-rank", "1", cwd=tmp_path, env=env).start()
    node0 = ServerProcess(tiny_llama, *common, "--node-rank", "0", "--port", "0", cwd=tmp_path, env=env).start()
    try:
        ready = node0.wait_event("ready")
        joined = node1.wait_event("joined")
        assert joined["node_rank"] == 1 and joined["stage"] == 1
        assert [(r["node"], r["stage"]) for r in ready["ranks"]] == [(0, 0), (1, 1)]
        url = ready["url"]
        for prompt in PROMPTS:
            choice = completion(url, "llama", prompt, 10)
            assert len(choice["token_ids"]) == 10 or choice["finish_reason"] == "stop"
        # every hidden state crossed between the nodes as int8 with zstd
        tensor = eventually_metric(url, "orion_codec_tensor_bytes_total", codec="int8+zstd", direction="encode",
                                   stage="0")
        wire = metric(url, "orion_codec_frame_bytes_total", codec="int8+zstd", direction="encode", stage="0")
        tokens = metric(url, "orion_activation_tokens_total", stage="0")
        assert tensor and wire and wire < 0.35 * tensor
        assert wire / tokens < 0.35 * 4 * 64  # bytes per token, against 4-byte floats x hidden size 64
        assert metric(url, "orion_codec_frames_total", codec="raw", direction="encode") is None
    finally:
        node0.stop()
        assert node1.wait(60) is not None, "node 1 did not stop with node 0"
        leftovers = node0.kill_leftovers() + node1.kill_leftovers()
        assert not leftovers, leftovers


# -- helpers -----------------------------------------------------------------------------


def with_layers(model_dir: Path, layers: int, output: Path) -> Path:
    """The tiny model's architecture with another layer count, random init, same tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(output)
    hf_tokenizer(str(model_dir)).save_pretrained(output)
    (output / "generation_config.json").write_text((model_dir / "generation_config.json").read_text())
    return output


def hf_model_parameters(model_dir: Path):
    from serve_testing import hf_model

    return list(hf_model(str(model_dir)).parameters())
