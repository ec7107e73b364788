"""What scored and batched requests cost orion serve, on the ~110M-parameter Llama of bench_serve.py.

Two ratios, each from interleaved rounds against one `orion serve` (tp=1, --max-batch-size 32), medians:
  - logprobs: single-stream tokens/s of a completion asking for `logprobs: 5` over the same completion
    without (every request generates exactly --tokens tokens: ignore_eos);
  - batched prompts: aggregate tokens/s of 8 concurrent clients each sending 4 prompts in one request,
    over 32 concurrent clients each sending one prompt; the same 32 sequences either way.
Also the prompt-scoring rate (echo + logprobs with max_tokens 0, lm-eval's loglikelihood request).

    python benchmarks/bench_serve_clients.py [--tokens 64] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_serve import build_model  # noqa: E402
from measure import concurrently  # noqa: E402
from server_process import ServerProcess  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT = "import os\nimport sys\n\n\ndef main():\n"


MODEL = "llama-110m"  # bench_serve.build_model's directory: the served name


def completion(url: str, tokens: int, **extra) -> int:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def single_stream(url: str, tokens: int, **extra) -> float:
    start = time.perf_counter()
    generated = completion(url, tokens, **extra)
    return generated / (time.perf_counter() - start)


def concurrent(url: str, clients: int, prompts_per_request: int, tokens: int) -> float:
    """Aggregate generated tokens/s of `clients` clients, each sending one request of `prompts_per_request`."""
    prompt = PROMPT if prompts_per_request == 1 else [PROMPT] * prompts_per_request
    counts, seconds = concurrently(clients, lambda i: completion(url, tokens, prompt=prompt))
    return sum(counts) / seconds


def scoring_rate(url: str, prompt_ids: list[int], requests: int = 8) -> float:
    """Prompt tokens scored per second (echo, logprobs 1, max_tokens 0)."""
    start = time.perf_counter()
    for _ in range(requests):
        completion(url, 0, prompt=prompt_ids, echo=True, logprobs=1)
    return requests * len(prompt_ids) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "orion-bench-serve")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = build_model(args.workdir / MODEL)
    server = ServerProcess(model_dir, "--port", "0", "--max-batch-size", "32", "--max-model-len", "1024",
                           cwd=args.workdir).start()
    figures: dict[str, list[float]] = {"plain": [], "logprobs5": [], "32x1": [], "8x4": [], "scoring": []}
    try:
        server.wait_ready(timeout=300)
        url = server.url
        completion(url, 4)  # warm up
        from transformers import AutoTokenizer

        prompt_ids = AutoTokenizer.from_pretrained(model_dir)((PROMPT * 40)[:4000])["input_ids"][:512]
        for round_ in range(args.rounds):
            figures["plain"].append(single_stream(url, args.tokens))
            figures["logprobs5"].append(single_stream(url, args.tokens, logprobs=5))
            figures["32x1"].append(concurrent(url, 32, 1, args.tokens))
            figures["8x4"].append(concurrent(url, 8, 4, args.tokens))
            figures["scoring"].append(scoring_rate(url, prompt_ids))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items()), file=sys.stderr)
    finally:
        server.stop()
        server.kill_leftovers()
    median = {k: statistics.median(v) for k, v in figures.items()}
    result = {
        "tokens_per_request": args.tokens, "rounds": args.rounds, "load_average": os.getloadavg(),
        "median_tokens_per_s": {k: round(v, 1) for k, v in median.items() if k != "scoring"},
        "prompt_tokens_scored_per_s": round(median["scoring"], 1),
        "logprobs5_vs_plain": round(median["logprobs5"] / median["plain"], 3),
        "8x4_vs_32x1": round(median["8x4"] / median["32x1"], 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**result, "rounds_raw": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
