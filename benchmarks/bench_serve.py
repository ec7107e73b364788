"""orion serve against transformers, side by side, on a ~110M-parameter Llama built here (random init, fp32).

Measured in one run, on the same machine and model:
  - in-process transformers generate() (greedy, fixed length), in a child process that stays up: each
    single-stream server request is paired with a generate() of the same length run just before it, so the
    ratio holds on a machine whose load changes; also one decode step of orion's model at batch 1 and 8
    in-process, the ceiling of what batching can give on this CPU
  - `transformers serve` (the peer users have), and `orion serve` at tp=1 and tp=2:
    single-stream tokens/s, aggregate tokens/s with 1, 4 and 8 concurrent streaming clients,
    time to first token, resident memory per process / rank
  - `orion serve --pp 2 --activation-codec int8`: bytes per token between the stages, against raw

Every request generates exactly --tokens tokens (orion: ignore_eos; transformers: min_new_tokens), through
/v1/chat/completions with streaming, which both servers implement. The "N clients / single" column is the
aggregate with N clients over the single-stream tokens/s (median of --repeats requests).

    python benchmarks/bench_serve.py                       # full run, a markdown table and a JSON file
    python benchmarks/bench_serve.py --quick               # fewer tokens and requests, for a smoke run
    python benchmarks/bench_serve.py --peer llama.cpp      # against llama-server instead (serve_peer.py)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the server-process helper the tests use

from server_process import ServerProcess  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MESSAGES = [{"role": "user", "content": "Write a Python function that parses a CSV file and returns the rows."}]


# -- the model ------------------------------------------------------------------------------


def build_model(path: Path, vocab_size: int = 16384) -> Path:
    """Llama shapes at ~110M parameters: hidden 768, 12 layers, 12 heads, MLP 2048, vocabulary 16384 (88M with
    vocabulary 2048, the model of serve_peer.py)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from orion_cli.reference.corpus import corpus_text
    from orion_cli.reference.tokenizer import EOS, PAD, train_tokenizer

    tokenizer = train_tokenizer(corpus_text("train", 2_000_000), vocab_size)
    eos, pad = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])  # llama.cpp's converter reads it
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- in-process generate, in a child process that stays up (its memory is its own) -------------------


def child_generate(model_dir: str) -> None:
    """Serve timing requests on stdin, one JSON line each: {"tokens": N} times generate() of N tokens;
    {"scaling": [1, 8]} times one decode step of orion's StageModel at each batch size."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - start

    run(4)  # warm-up
    print(json.dumps({"rss_bytes": psutil.Process().memory_info().rss, "threads": torch.get_num_threads(),
                      "prompt_tokens": ids.shape[1]}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "tokens" in request:
            print(json.dumps({"seconds": run(request["tokens"])}), flush=True)
        else:
            print(json.dumps({"step_ms": decode_step_ms(model_dir, request["scaling"])}), flush=True)


def decode_step_ms(model_dir: str, batch_sizes: list[int], cached: int = 100, repeats: int = 8) -> dict[int, float]:
    """One decode step of orion's stage model (tp=1) at each batch size: the ceiling continuous batching has
    on this machine is batch x step(1) / step(batch)."""
    import torch
    from transformers import AutoConfig

    from orion_cli.checkpoint import CheckpointReader
    from orion_cli.serve.attention import Step
    from orion_cli.serve.plans import Shape
    from orion_cli.serve.stage import StageModel
    from orion_cli.serve.tp import TPGroup, WeightLoader

    config = AutoConfig.from_pretrained(model_dir)
    with CheckpointReader(model_dir) as reader:
        stage = StageModel(config, range(Shape.of(config).num_layers), True, True, TPGroup(),
                           WeightLoader(reader, torch.float32, torch.device("cpu")), max(batch_sizes), cached + 8)
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # interleaved, so load elsewhere on the machine hits every size alike
            for b in batch_sizes:
                start = time.perf_counter()
                step = Step.make(False, 0, [1] * b, [cached] * b, stage.device)
                stage.step(step, tokens=torch.zeros(b, 1, dtype=torch.long))
                times[b].append(time.perf_counter() - start)
    return {b: statistics.median(t[1:]) * 1e3 for b, t in times.items()}


class GenerateReference:
    """transformers generate() in a long-lived child: timed right before each server request, so both see the
    same load on a shared machine."""

    def __init__(self, model_dir: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "--child-generate", str(model_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        self.rates: list[float] = []
        self.ttfts: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the generate() child exited")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def tokens_per_s(self, tokens: int) -> float:
        rate = tokens / self.ask({"tokens": tokens})["seconds"]
        self.rates.append(rate)
        return rate

    def ttft(self) -> float:
        seconds = self.ask({"tokens": 1})["seconds"]
        self.ttfts.append(seconds)
        return seconds

    def summary(self) -> dict:
        return {"tokens_per_s": statistics.median(self.rates), "ttft_s": statistics.median(self.ttfts),
                "rss_bytes": self.info["rss_bytes"], "threads": self.info["threads"]}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# -- clients ------------------------------------------------------------------------------------


def stream_chat(url: str, body: dict) -> tuple[float, float, int | None, str]:
    """(time to first token, total time, token ids received or None, text) of one streamed chat completion.

    orion sends each token's id (`return_token_ids`); transformers serve streams text through
    TextIteratorStreamer, which holds tokens back until a word ends, so its chunks are not tokens.
    """
    start = time.perf_counter()
    first, count, text = None, None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(chunk["error"])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or choice.get("token_ids"):
                    first = first or time.perf_counter()
                    text.append(delta.get("content") or "")
                    if "token_ids" in choice:
                        count = (count or 0) + len(choice["token_ids"])
    return (first or time.perf_counter()) - start, time.perf_counter() - start, count, "".join(text)


def check_length(record: tuple, tokens: int, tokenizer) -> None:
    """Every request must have produced `tokens` tokens: counted ids, or (text-only servers) a re-tokenized
    length near it, since decode-then-encode does not give back the same ids exactly."""
    _, _, count, text = record
    if count is not None:
        assert count == tokens, f"expected {tokens} tokens, got {count}"
        return
    retokenized = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert 0.5 * tokens <= retokenized <= 1.5 * tokens, f"expected about {tokens} tokens, text re-tokenizes to {retokenized}"


def measure_server(url: str, body: dict, tokens: int, repeats: int, concurrency: list[int], per_client: int,
                   tokenizer, reference: GenerateReference) -> dict:
    """Throughput counts `tokens` per request: every request is forced to exactly that length
    (orion: ignore_eos; transformers: min_new_tokens), which check_length() confirms. Each single-stream
    request is paired with an in-process generate() of the same length just before it."""
    stream_chat(url, {**body, "max_tokens": 4})  # warm-up (transformers serve loads the model now)
    singles, paired, paired_ttft = [], [], []
    for _ in range(repeats):
        generate_rate, generate_ttft = reference.tokens_per_s(tokens), reference.ttft()
        record = stream_chat(url, body)
        check_length(record, tokens, tokenizer)
        singles.append(record)
        paired.append(tokens / record[1] / generate_rate)
        paired_ttft.append(record[0] / generate_ttft)
    result = {
        "single_tokens_per_s": statistics.median(tokens / record[1] for record in singles),
        "single_ttft_s": statistics.median(record[0] for record in singles),
        "single_vs_generate": statistics.median(paired),
        "ttft_vs_generate": statistics.median(paired_ttft),
        "concurrent": {},
    }
    for clients in concurrency:
        records: list[tuple[float, float, int]] = []
        lock = threading.Lock()

        def client() -> None:
            for _ in range(per_client):
                record = stream_chat(url, body)
                with lock:
                    records.append(record)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        for record in records:
            check_length(record, tokens, tokenizer)
        result["concurrent"][clients] = {
            "aggregate_tokens_per_s": tokens * len(records) / wall,
            "ttft_median_s": statistics.median(r[0] for r in records),
            "requests": len(records),
        }
    return result


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def rss_of(pids: list[int]) -> list[int]:
    import psutil

    return [psutil.Process(pid).memory_info().rss for pid in pids]


# -- the servers ---------------------------------------------------------------------------------


def bench_orion(model_dir: Path, tp: int, args, reference: GenerateReference) -> dict:
    body = {"model": model_dir.name, "messages": MESSAGES, "max_tokens": args.tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "return_token_ids": True}
    with ServerProcess(model_dir, "--tp", str(tp), "--port", "0", "--max-model-len", "1024",
                       "--max-batch-size", "8") as server:
        server.wait_ready(600)
        result = measure_server(server.url, body, args.tokens, args.repeats, args.concurrency, args.per_client,
                                tokenizer_of(model_dir), reference)
        ranks = server.ready["ranks"]
        result["ranks"] = [{"rank": r["rank"], "weight_bytes": r["weight_bytes"], "rss_bytes": rss}
                           for r, rss in zip(ranks, rss_of([r["pid"] for r in ranks]))]
        return result


def bench_orion_codec(model_dir: Path, codec: str, args) -> dict:
    """Bytes per token between two pipeline stages with `codec`, read from the server's /metrics."""
    body = {"model": model_dir.name, "messages": MESSAGES, "max_tokens": 32, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with ServerProcess(model_dir, "--pp", "2", "--activation-codec", codec, "--port", "0",
                       "--max-model-len", "1024") as server:
        server.wait_ready(600)
        threads = [threading.Thread(target=stream_chat, args=(server.url, body)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(3)  # ranks report their codec counters to rank 0 every 2 s
        sent = {"stage": "0", "direction": "encode"}
        tensor = _metric_sum(server.url, "orion_codec_tensor_bytes_total", **sent)
        wire = _metric_sum(server.url, "orion_codec_frame_bytes_total", **sent)
        tokens = _metric_sum(server.url, "orion_activation_tokens_total", stage="0")
    return {"codec": codec, "tokens": tokens, "raw_bytes_per_token": tensor / tokens,
            "wire_bytes_per_token": wire / tokens, "wire_over_raw": wire / tensor}


def _metric_sum(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text, value = line[len(name) + 1:].rsplit("} ", 1)
        have = dict((part.split("=", 1)[0], part.split("=", 1)[1].strip('"')) for part in label_text.split(","))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TransformersServe:
    """`transformers serve` as a child process in its own session, stopped by pid."""

    def __init__(self, model_dir: Path, continuous_batching: bool):
        self.port = _free_port()
        command = [str(Path(sys.executable).parent / "transformers"), "serve", "--port", str(self.port),
                   "--force_model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--log_level", "error"]
        if continuous_batching:
            command.append("--continuous_batching")
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"transformers-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start: {self.output()[-2000:]}")
            time.sleep(0.5)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def bench_transformers_serve(model_dir: Path, args, reference: GenerateReference) -> dict:
    """`transformers serve`; continuous batching is tried first, and why it cannot run is recorded."""
    body = {"model": str(model_dir), "messages": MESSAGES, "max_tokens": args.tokens, "temperature": 0,
            "stream": True, "generation_config": json.dumps({"min_new_tokens": args.tokens, "do_sample": False})}
    result: dict = {}
    server = TransformersServe(model_dir, continuous_batching=True)
    try:
        _, _, _, text = stream_chat(server.url, {**body, "max_tokens": 4})
        if not text:
            lines = [line for line in server.output().splitlines() if "Error" in line]
            result["continuous_batching"] = lines[-1].strip() if lines else "no tokens came back"
        else:
            result["continuous_batching"] = "ran"
    finally:
        server.stop()
    server = TransformersServe(model_dir, continuous_batching=result["continuous_batching"] == "ran")
    try:
        result.update(measure_server(server.url, body, args.tokens, args.repeats, args.concurrency, args.per_client,
                                     tokenizer_of(model_dir), reference))
        result["rss_bytes"] = rss_of([server.proc.pid])[0]
    finally:
        server.stop()
    return result


# -- report ----------------------------------------------------------------------------------------


def report(results: dict, args) -> str:
    """The markdown table; `results` as main() builds it or as read back from --json."""
    gib = 2**30
    top = max(args.concurrency)
    hf = results["transformers_generate"]
    lines = [f"Model: {results['model']} ({results['parameters'] / 1e6:.0f}M parameters, fp32), "
             f"{args.tokens} tokens per request, {os.cpu_count()} CPU cores, {args.threads} thread(s) per process, "
             f"load average at start {results['load_average']}, at end {results['load_average_end']}",
             "", "'vs generate' pairs each single-stream request with an in-process generate() run just before it "
             "(median of the ratios), so both see the same load on a shared machine.",
             "", "| engine | single tok/s | vs generate | TTFT s | TTFT vs generate | " +
             " | ".join(f"{c} clients tok/s" for c in args.concurrency) + f" | {top} clients / single | memory |",
             "|---|---|---|---|---|" + "---|" * len(args.concurrency) + "---|---|",
             f"| transformers generate (in-process) | {hf['tokens_per_s']:.1f} | 1.00 | {hf['ttft_s']:.3f} | 1.00 | " +
             " | ".join("-" for _ in args.concurrency) + f" | - | RSS {hf['rss_bytes'] / gib:.2f} GiB |"]
    for name in ("transformers_serve", "orion_tp1", "orion_tp2"):
        r = results.get(name)
        if not r:
            continue
        conc = {int(clients): figures for clients, figures in r["concurrent"].items()}
        if "ranks" in r:
            memory = "; ".join(f"rank {x['rank']}: weights {x['weight_bytes'] / gib:.2f} GiB, RSS "
                               f"{x['rss_bytes'] / gib:.2f} GiB" for x in r["ranks"])
        else:
            memory = f"RSS {r['rss_bytes'] / gib:.2f} GiB"
        label = name.replace("_", " ")
        if name == "transformers_serve":
            label += " (continuous batching)" if r["continuous_batching"] == "ran" else " (no continuous batching)"
        lines.append(f"| {label} | {r['single_tokens_per_s']:.1f} | {r['single_vs_generate']:.2f} | "
                     f"{r['single_ttft_s']:.3f} | {r['ttft_vs_generate']:.2f} | " +
                     " | ".join(f"{conc[c]['aggregate_tokens_per_s']:.1f}" for c in args.concurrency) +
                     f" | {conc[top]['aggregate_tokens_per_s'] / r['single_tokens_per_s']:.2f} | {memory} |")
    if results.get("transformers_serve", {}).get("continuous_batching") not in (None, "ran"):
        lines += ["", f"transformers serve --continuous_batching failed: {results['transformers_serve']['continuous_batching']}"]
    steps = {int(size): ms for size, ms in (hf.get("decode_step_ms") or {}).items()}
    if steps:
        b1, bt = steps[1], steps[top]
        lines += ["", f"Decode step in-process (orion StageModel, tp=1): batch 1 {b1:.1f} ms, batch {top} {bt:.1f} ms; "
                      f"the most continuous batching can give here is {top} x {b1:.1f} / {bt:.1f} = {top * b1 / bt:.2f}x"]
    if "orion_tp1" in results and "orion_tp2" in results:
        w1 = results["orion_tp1"]["ranks"][0]["weight_bytes"]
        w2 = max(x["weight_bytes"] for x in results["orion_tp2"]["ranks"])
        lines += ["", f"Resident weights per rank, tp=2 / tp=1: {w2 / w1:.2f}"]
        if "transformers_serve" in results:
            ours, theirs = (results[n]["concurrent"][str(top) if str(top) in results[n]["concurrent"] else top]
                            ["aggregate_tokens_per_s"] for n in ("orion_tp1", "transformers_serve"))
            lines.append(f"orion tp=1 with {top} clients vs transformers serve with {top} clients: {ours / theirs:.2f}x")
    for codec in results.get("codecs", []):
        lines.append(f"--pp 2 --activation-codec {codec['codec']}: {codec['wire_bytes_per_token']:.0f} bytes/token on the "
                     f"wire vs {codec['raw_bytes_per_token']:.0f} raw ({codec['wire_over_raw']:.3f}x)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "orion-bench-serve")
    parser.add_argument("--tokens", type=int, help="tokens generated per request (128; 48 with --peer)")
    parser.add_argument("--repeats", type=int, default=3, help="single-stream requests (median)")
    parser.add_argument("--concurrency", default="1,4,8", help="concurrent clients, comma-separated")
    parser.add_argument("--per-client", type=int, default=2, help="requests each concurrent client sends")
    parser.add_argument("--only", default="transformers_serve,orion_tp1,orion_tp2,codec",
                        help="which parts to run, comma-separated (in-process generate always runs)")
    parser.add_argument("--quick", action="store_true", help="32 tokens, 1 repeat, 1 request per client")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads per process / rank (OMP_NUM_THREADS); on a shared machine 1 avoids "
                             "OpenMP barrier stalls when a core is busy elsewhere")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--peer", choices=["llama.cpp"],
                        help="instead: orion against llama-server on the same weights (benchmarks/serve_peer.py)")
    parser.add_argument("--model", default="88m", help="--peer: 88m (built here), tinyllama, or a model directory")
    parser.add_argument("--rounds", type=int, default=2, help="--peer: interleaved rounds")
    parser.add_argument("--systems", help="--peer: which systems, comma-separated (default: all)")
    parser.add_argument("--prompt-words", type=int, default=0,
                        help="--peer: this many words of text before the question (long-context decoding)")
    parser.add_argument("--child-generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_generate:
        child_generate(args.child_generate)
        return 0
    if args.peer:
        import serve_peer

        args.tokens = args.tokens or 48
        return serve_peer.main(args)
    args.tokens = args.tokens or 128
    if args.quick:
        args.tokens, args.repeats, args.per_client = 32, 1, 1
    args.concurrency = sorted({1, *(int(c) for c in args.concurrency.split(","))})
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every engine's processes
    only = set(args.only.split(","))
    model_dir = build_model(args.workdir / "llama-110m")
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        parameters = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in f.keys())
    results: dict = {"model": str(model_dir), "parameters": parameters, "tokens": args.tokens,
                     "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
    reference = GenerateReference(model_dir)
    try:
        steps = [("transformers_serve", "transformers_serve", lambda: bench_transformers_serve(model_dir, args, reference)),
                 ("orion_tp1", "orion_tp1", lambda: bench_orion(model_dir, 1, args, reference)),
                 ("orion_tp2", "orion_tp2", lambda: bench_orion(model_dir, 2, args, reference)),
                 ("codec", "codecs", lambda: [bench_orion_codec(model_dir, "int8", args)])]
        for key, name, run in steps:
            if key in only:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                results[name] = run()
        if not reference.rates:
            reference.tokens_per_s(args.tokens)
            reference.ttft()
        results["transformers_generate"] = {**reference.summary(),
                                            "decode_step_ms": reference.ask({"scaling": args.concurrency})["step_ms"]}
    finally:
        reference.close()
    results["load_average_end"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
