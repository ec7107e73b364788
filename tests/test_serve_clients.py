"""What real clients send to orion serve: scored and batched requests, the requests that used to end the
server, and the operational edges (413, disconnects, 404/405 bodies, /openapi.json, vLLM's metrics).

One tp=1 server on the tiny Llama for the module; every test leaves it healthy.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch

from server_process import serving

from serve_testing import hf_greedy, hf_model, hf_tokenizer, metric, tokenize

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LIMIT = 2 << 20  # --max-request-bytes
PROMPTS = ["def main():\n    return", "import os\nimport", "class Foo(object):\n    x = 1"]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with serving(tiny_llama, "--port", "0", "--max-model-len", "96", "--max-batch-size", "8",
                 "--max-request-bytes", str(LIMIT), cwd=tmp_path_factory.mktemp("serve-clients")) as process:
        yield process


def post(server, path: str = "/v1/completions", expect: int = 200, **body) -> dict:
    body = {"model": "llama", "temperature": 0, **body}
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == expect, response.text
    return response.json()


def hf_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of `ids` [len, vocab], float32."""
    with torch.inference_mode():
        logits = hf_model(str(model_dir))(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)


def assert_healthy(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=5).json() == {"status": "ok"}
    assert post(server, prompt="ok", max_tokens=2)["choices"][0]["finish_reason"] == "length"


# -- scored requests ----------------------------------------------------------------------------------


def test_echo_scores_the_prompt_as_transformers_does(server, tiny_llama):
    ids = tokenize(tiny_llama, PROMPTS[0] + " 42\n")
    reference = hf_logprobs(tiny_llama, ids)
    for max_tokens in (0, 1):  # prompt scoring only; and lm-eval's way (one generated token after the prompt)
        choice = post(server, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=5)["choices"][0]
        scored = choice["logprobs"]
        assert len(scored["tokens"]) == len(ids) + max_tokens
        assert scored["token_logprobs"][0] is None and scored["top_logprobs"][0] is None
        for position in range(1, len(ids)):
            want = reference[position - 1, ids[position]].item()
            assert abs(scored["token_logprobs"][position] - want) < 1e-4
            top = scored["top_logprobs"][position]
            assert 1 <= len(top) <= 6 and abs(max(top.values()) - reference[position - 1].max().item()) < 1e-4
        assert choice["text"].startswith(hf_tokenizer(str(tiny_llama)).decode(ids))
        assert scored["text_offset"] == sorted(scored["text_offset"])
    generated = scored["token_logprobs"][-1]
    assert abs(generated - reference[-1].max().item()) < 1e-4  # greedy: the most likely next token


def test_generated_tokens_logprobs_on_completions_and_chat(server, tiny_llama):
    ids = tokenize(tiny_llama, PROMPTS[1])
    choice = post(server, prompt=ids, max_tokens=6, logprobs=3, return_token_ids=True)["choices"][0]
    tokens = choice["token_ids"]
    reference = hf_logprobs(tiny_llama, ids + tokens)
    for step, logprob in enumerate(choice["logprobs"]["token_logprobs"][: len(tokens)]):
        assert abs(logprob - reference[len(ids) - 1 + step, tokens[step]].item()) < 1e-4
    chat = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    assert chat and all(len(item["top_logprobs"]) == 2 and item["bytes"] == list(item["token"].encode())
                        for item in chat)
    post(server, "/v1/chat/completions", expect=400, messages=[{"role": "user", "content": "hi"}], top_logprobs=2)


# -- batched requests ------------------------------------------------------------------------------------


def test_several_prompts_and_n_choices_in_one_request(server, tiny_llama):
    as_ids = [tokenize(tiny_llama, p) for p in PROMPTS]
    for prompt in (PROMPTS, as_ids):
        body = post(server, prompt=prompt, n=2, max_tokens=6, return_token_ids=True)
        assert [c["index"] for c in body["choices"]] == list(range(6))
        for index, choice in enumerate(body["choices"]):
            assert choice["token_ids"] == hf_greedy(tiny_llama, as_ids[index // 2], 6)
        assert body["usage"]["prompt_tokens"] == sum(len(p) for p in as_ids)
        assert body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in body["choices"])
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"model": "llama", "prompt": PROMPTS[:2], "max_tokens": 5, "temperature": 0,
                            "stream": True, "return_token_ids": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            streamed[choice["index"]] += choice["token_ids"]
    assert streamed == {i: hf_greedy(tiny_llama, as_ids[i], 5) for i in (0, 1)}


def test_best_of_keeps_the_most_likely_sequences(server):
    sampled = post(server, prompt=PROMPTS[2], n=3, max_tokens=6, temperature=1.0, seed=7, logprobs=0)["choices"]
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in sampled]
    best = post(server, prompt=PROMPTS[2], n=1, best_of=3, max_tokens=6, temperature=1.0, seed=7)["choices"]
    assert best[0]["text"] == sampled[totals.index(max(totals))]["text"]
    assert best[0]["logprobs"] is None  # ranked with log-probabilities nobody asked to see
    post(server, expect=400, prompt="x", n=2, best_of=1)
    post(server, expect=400, prompt="x", best_of=2, stream=True)


def test_sixteen_stop_strings(server):
    stops = [f"zz{i}" for i in range(15)] + ["\n"]
    text = post(server, prompt=PROMPTS[0], max_tokens=30, stop=stops)["choices"][0]["text"]
    assert "\n" not in text
    assert post(server, expect=400, prompt="x", stop=stops + ["more"])["error"]["param"] == "stop"


def test_repetition_penalty_matches_transformers(server, tiny_llama):
    ids = tokenize(tiny_llama, PROMPTS[0])
    with torch.inference_mode():
        out = hf_model(str(tiny_llama)).generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                                 repetition_penalty=1.3, min_new_tokens=12)
    want = out[0, len(ids):].tolist()
    got = post(server, prompt=ids, max_tokens=12, repetition_penalty=1.3, ignore_eos=True,
               return_token_ids=True)["choices"][0]["token_ids"]
    assert got == want
    for field in ("presence_penalty", "frequency_penalty"):
        assert post(server, prompt=ids, max_tokens=4, **{field: 1.5})["choices"][0]["text"] is not None
        post(server, expect=400, prompt=ids, **{field: 2.5})


def test_unknown_fields_are_ignored(server):
    assert post(server, prompt="x", max_tokens=2, metadata={"k": "v"}, store=False)["choices"]
    assert post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                stream_options=None, service_tier="auto")["choices"]


def test_structured_output_is_refused_with_the_reason(server):
    error = post(server, "/v1/chat/completions", expect=400, messages=[{"role": "user", "content": "x"}],
                 response_format={"type": "json_object"})["error"]
    assert error["param"] == "response_format" and "grammar" in error["message"]


# -- requests that used to end the server -------------------------------------------------------------------


@pytest.mark.parametrize("body, status", [
    ({"seed": 2**64, "temperature": 1.0}, 400),
    ({"seed": -(2**63) - 1, "temperature": 1.0}, 400),
    ({"seed": 2**64 - 1, "temperature": 1.0}, 200),
    ({"seed": -(2**63), "temperature": 1.0}, 200),
    ({"temperature": 1e-40}, 200),
    ({"max_tokens": 0}, 400),
])
def test_requests_that_ended_the_server_now_end_only_themselves(server, body, status):
    answer = post(server, expect=status, prompt=PROMPTS[0], **{"max_tokens": 4, **body})
    if status == 400:
        assert answer["error"]["param"] in ("seed", "max_tokens")
    assert_healthy(server)


def test_a_tiny_temperature_is_greedy(server, tiny_llama):
    ids = tokenize(tiny_llama, PROMPTS[1])
    got = post(server, prompt=ids, max_tokens=8, temperature=1e-40, return_token_ids=True)["choices"][0]["token_ids"]
    assert got == hf_greedy(tiny_llama, ids, 8)


# -- operations ------------------------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413(server):
    big = json.dumps({"model": "llama", "prompt": "x" * (LIMIT + 10)}).encode()
    response = httpx.post(f"{server.url}/v1/completions", content=big, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1 << 16):
            yield big[start:start + (1 << 16)]

    response = httpx.post(f"{server.url}/v1/completions", content=chunked(), timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert_healthy(server)


def test_health_answers_while_a_huge_prompt_is_tokenized(server):
    prompt = "the quick brown fox jumps over the lazy dog. " * 40_000  # 1.8 MB: seconds of tokenizing
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        r=httpx.post(f"{server.url}/v1/completions", json={"model": "llama", "prompt": prompt}, timeout=120)))
    worker.start()
    time.sleep(0.3)
    slowest = 0.0
    while worker.is_alive():
        start = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.05)
    worker.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert slowest < 1.0, f"/health took {slowest:.1f} s while a prompt was tokenized"


def test_a_client_that_goes_away_cancels_its_non_streamed_request(server):
    body = json.dumps({"model": "llama", "prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0,
                       "ignore_eos": True}).encode()
    before = metric(server.url, "vllm:generation_tokens_total") or 0.0
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 20
        while metric(server.url, "vllm:num_requests_running") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 5
    while metric(server.url, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the request of a client that left kept generating"
        time.sleep(0.05)
    generated = metric(server.url, "vllm:generation_tokens_total")
    time.sleep(0.5)
    assert metric(server.url, "vllm:generation_tokens_total") == generated
    assert generated - before < 80  # it did not run to the end


def test_every_error_has_openais_shape(server):
    for method, path, status in (("GET", "/v1/nowhere", 404), ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        response = httpx.request(method, f"{server.url}{path}", timeout=10)
        assert response.status_code == status
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"] == status


def test_openapi_is_served_and_says_400_not_422(server):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"200", "400", "413", "500", "503"} <= set(responses)
    assert "HTTPValidationError" not in json.dumps(schema)


def test_metrics_carry_vllms_names_and_the_model_label(server):
    post(server, prompt=PROMPTS[0], max_tokens=3)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:request_success_total"):
        assert any(line.startswith(name) and 'model_name="llama"' in line for line in text.splitlines()), name
    assert metric(server.url, "vllm:request_success_total", model_name="llama", finished_reason="length") >= 1
    assert 'orion_rank_weight_bytes{node="0",rank="0",stage="0",tp_rank="0"}' in text
