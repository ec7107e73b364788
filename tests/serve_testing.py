"""Helpers shared by the tests/test_serve*.py modules: transformers references and /metrics parsing."""

from __future__ import annotations

import socket
from functools import lru_cache

import httpx


@lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@lru_cache(maxsize=8)
def hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize(model_dir, text: str) -> list[int]:
    return hf_tokenizer(str(model_dir))(text)["input_ids"]


def hf_greedy(model_dir, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers generate(), greedy, in this process; eos dropped as the server drops it."""
    import torch

    model = hf_model(str(model_dir))
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    generated = out[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(generated):
        if token in eos:
            return generated[:i]
    return generated


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(url: str, name: str, **labels: str) -> float | None:
    """A sample's value from /metrics (summed over label sets matching `labels`), None when absent."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample != name:
            continue
        have = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part)
        if all(have.get(k, "").strip('"') == v for k, v in labels.items()):
            total += float(value)
            found = True
    return total if found else None


def used_buckets(url: str, histogram: str) -> list[float]:
    """Upper bounds of the histogram buckets that received observations."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts = []
    for line in text.splitlines():
        if line.startswith(histogram + "_bucket{"):
            bound = line.split('le="')[1].split('"')[0]
            counts.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    used, previous = [], 0.0
    for bound, count in counts:
        if count > previous:
            used.append(bound)
        previous = count
    return used


def eventually_metric(url: str, name: str, timeout: float = 10.0, **labels: str) -> float | None:
    """Like metric(), waiting for per-rank figures, which ranks report to rank 0 every few seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = metric(url, name, **labels)
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def assert_prompt_scoring_matches(url: str, model: str, model_dir, text: str = "def main():\n    return 42\n") -> None:
    """echo + logprobs (lm-eval's loglikelihood request) equals transformers' log-softmax within 1e-4, and the
    requests that used to end the engine (a seed past 64 bits, a 1e-40 temperature) end only themselves."""
    import torch

    ids = tokenize(model_dir, text)
    with torch.inference_mode():
        reference = hf_model(str(model_dir))(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    body = {"model": model, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    scored = response.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert scored[0] is None and len(scored) == len(ids) + 1
    worst = max(abs(scored[i] - reference[i - 1, ids[i]].item()) for i in range(1, len(ids)))
    assert worst < 1e-4, worst
    for extra, status in (({"seed": 2**64, "temperature": 1.0}, 400), ({"temperature": 1e-40}, 200)):
        answer = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": text, "max_tokens": 3, **extra},
                            timeout=120)
        assert answer.status_code == status, answer.text
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def kl_divergence(reference, other) -> float:
    """Mean KL(reference || other) over positions of two [positions, vocab] logit arrays."""
    import numpy as np

    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(other)
    return float((np.exp(p) * (p - q)).sum(-1).mean())
