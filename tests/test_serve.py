"""orion serve at tp=1, through a real server process: HTTP API, batching, bad input, shutdown.

One server is started for the whole module (tiny Llama, with an API key) and
stopped by the last test, which checks that SIGTERM drains an in-flight request
and that no process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from server_process import serving

from serve_testing import hf_greedy, hf_tokenizer, metric, tokenize, used_buckets

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["def main():\n    return", "import os\nimport", "class Foo(object):\n    x = 1", "for i in range(10):"]


@pytest.fixture(scope="module")
def server_tmpdir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-tmpdir")


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory, server_tmpdir):
    with serving(tiny_llama, "--port", "0", "--api-key", KEY, "--max-model-len", "96", "--max-batch-size", "8",
                 cwd=tmp_path_factory.mktemp("serve-tp1"), env={"TMPDIR": str(server_tmpdir)}) as process:
        yield process


def complete(server, **body) -> dict:
    body = {"model": "llama", "temperature": 0, **body}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stream(server, path: str, **body) -> tuple[list[dict], str]:
    """Parsed SSE chunks and the raw text of a streamed request."""
    body = {"model": "llama", "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", f"{server.url}{path}", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200, response.read()
        raw = "".join(response.iter_text())
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    return chunks, raw


def test_greedy_output_equals_transformers_generate(server, tiny_llama):
    for prompt in PROMPTS:
        reply = complete(server, prompt=prompt, max_tokens=12, return_token_ids=True)
        choice = reply["choices"][0]
        ids = tokenize(tiny_llama, prompt)
        assert choice["prompt_token_ids"] == ids
        assert choice["token_ids"] == hf_greedy(tiny_llama, ids, 12), prompt
        assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(choice["token_ids"]),
                                  "total_tokens": len(ids) + len(choice["token_ids"])}


def test_streaming_joined_equals_non_streaming(server):
    whole = complete(server, prompt=PROMPTS[0], max_tokens=16, return_token_ids=True)["choices"][0]
    chunks, raw = stream(server, "/v1/completions", prompt=PROMPTS[0], max_tokens=16, return_token_ids=True,
                         stream_options={"include_usage": True})
    assert raw.rstrip().endswith("data: [DONE]")
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["text"]
    assert [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"]] == whole["token_ids"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(whole["token_ids"])

    messages = [{"role": "user", "content": "print the answer"}]
    body = dict(messages=messages, max_tokens=10)
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "llama", "temperature": 0, **body},
                          headers=AUTH, timeout=60)
    chat = response.json()["choices"][0]["message"]["content"]
    chunks, _ = stream(server, "/v1/chat/completions", **body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == chat


def test_chat_uses_the_tokenizers_template(server, tiny_llama):
    tokenizer = hf_tokenizer(str(tiny_llama))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "llama", "messages": messages, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
    choice = response.json()["choices"][0]
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == hf_greedy(tiny_llama, ids, 8)
    assert choice["message"]["role"] == "assistant"


def test_eight_concurrent_clients_get_their_own_answers(server, tiny_llama):
    prompts = [f"{PROMPTS[i % 4]} # client {i}" for i in range(8)]
    lengths = [6 + 3 * i for i in range(8)]  # clients leave the batch at different steps
    expected = [hf_greedy(tiny_llama, tokenize(tiny_llama, p), n) for p, n in zip(prompts, lengths)]
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(8)

    def client(i: int) -> None:
        barrier.wait()
        reply = complete(server, prompt=prompts[i], max_tokens=lengths[i], return_token_ids=True)
        results[i] = reply["choices"][0]["token_ids"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(8)] == expected
    assert max(used_buckets(server.url, "orion_decode_batch_size")) > 1  # decode steps were shared


def test_seeded_sampling_is_reproducible(server):
    body = dict(prompt=PROMPTS[1], max_tokens=12, temperature=0.9, top_p=0.9, return_token_ids=True)
    first = complete(server, seed=1234, **body)["choices"][0]["token_ids"]
    again = complete(server, seed=1234, **body)["choices"][0]["token_ids"]
    others = {tuple(complete(server, seed=s, **body)["choices"][0]["token_ids"]) for s in (1, 2, 3)}
    assert first == again
    assert len(others | {tuple(first)}) > 1  # the seed changes the sample


def test_stop_strings_end_the_text_before_them(server):
    full = complete(server, prompt=PROMPTS[2], max_tokens=20)["choices"][0]["text"]
    stop = full[5:8]
    assert stop and stop in full
    cut = complete(server, prompt=PROMPTS[2], max_tokens=20, stop=[stop])["choices"][0]
    assert cut["text"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"
    chunks, _ = stream(server, "/v1/completions", prompt=PROMPTS[2], max_tokens=20, stop=stop)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]


def test_openai_client_round_trip(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["llama"]
    chat = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 8
    streamed = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    completion = client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].text == complete(server, prompt=PROMPTS[0], max_tokens=5)["choices"][0]["text"]


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"model": "llama", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "llama", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "llama", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "llama", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": "llama", "prompt": "word " * 200}, 400, "prompt"),
    ({"model": "llama", "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ({"model": "llama"}, 400, "prompt"),
    ([1, 2], 400, None),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/v1/completions", content=content, timeout=30,
                          headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param
    assert complete(server, prompt="ok", max_tokens=2)["choices"][0]["finish_reason"] == "length"


def test_api_key_is_required_on_v1_routes_only(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200


def test_models_health_and_metrics(server, tiny_llama):
    card = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["data"][0]
    assert card["id"] == "llama" and card["object"] == "model" and card["max_model_len"] == 96
    assert card["orion"]["tp"] == 1 and card["orion"]["architecture"] == "LlamaForCausalLM"
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ('vllm:num_requests_running{model_name="llama"}', "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 'orion_rank_weight_bytes{node="0",rank="0",stage="0",tp_rank="0"}'):
        assert name in text, name


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    """32 sequences of 80 tokens, four batches of eight: still decoding when the client leaves (one sequence of
    80 could finish, on this model, before /metrics was read)."""
    body = {"model": "llama", "prompt": PROMPTS[3], "max_tokens": 80, "temperature": 0, "stream": True, "n": 32,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert _metric(server, "vllm:num_requests_running") >= 1
    deadline = time.monotonic() + 10
    while _metric(server, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the slot of a disconnected client was not freed"
        time.sleep(0.1)
    generated = _metric(server, "vllm:generation_tokens_total")
    time.sleep(0.5)
    assert _metric(server, "vllm:generation_tokens_total") == generated  # nothing decodes for it any more


def test_sigterm_drains_in_flight_requests_and_stops(server, tiny_llama, server_tmpdir):
    """Last test of the module: it stops the shared server."""
    body = {"model": "llama", "prompt": PROMPTS[3], "max_tokens": 60, "temperature": 0, "stream": True,
            "return_token_ids": True}
    chunks: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        chunks.append(next(lines))
        # a long request in flight too (64 sequences of 80 tokens, seconds on this model), so the drain lasts
        long = {"model": "llama", "prompt": "x", "n": 64, "max_tokens": 80, "ignore_eos": True}
        answered = {}
        worker = threading.Thread(target=lambda: answered.update(r=httpx.post(
            f"{server.url}/v1/completions", json=long, headers=AUTH, timeout=120)))
        worker.start()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # draining: new requests are answered 503 at once (not reset, not left hanging)
        start = time.perf_counter()
        refused = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=10)
        assert refused.status_code == 503 and time.perf_counter() - start < 2
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        chunks.extend(line for line in lines if line)
    worker.join(120)
    assert answered["r"].status_code == 200 and len(answered["r"].json()["choices"]) == 64  # drained in full
    events = [json.loads(c[6:]) for c in chunks if c.startswith("data: {")]
    assert chunks[-1] == "data: [DONE]"
    streamed = [t for e in events for t in e["choices"][0]["token_ids"]]
    assert streamed == hf_greedy(tiny_llama, tokenize(tiny_llama, PROMPTS[3]), 60)  # answered in full
    assert server.wait(60) == 0
    stopped = server.wait_event("stopped", timeout=5)
    assert stopped["stopped_by"] == "SIGTERM" and stopped["drained"] is True
    assert not server.kill_leftovers(), "a rank outlived the server"
    assert os.listdir(server_tmpdir) == [], "the server left temporary files (torchelastic's logs?)"


def _metric(server, name: str) -> float:
    value = metric(server.url, name)
    assert value is not None, f"{name} not in /metrics"
    return value
