"""orion serve against llama-server on the same weights: `python benchmarks/bench_serve.py --peer llama.cpp`.

One script, the systems interleaved round by round, a fresh server for every
measurement (started, warmed with one request, measured, stopped), on:

  - an 88M-parameter Llama (hidden 768, 12 layers, MLP 2048, vocabulary 2048, fp32, random init), built here;
  - `--model tinyllama`: TinyLlama-1.1B's shapes, random bf16 weights (benchmarks/real_shapes.py writes them).

Systems (same checkpoint for all):
  llama.cpp F32        llama-server -np 8 -t 2 on convert_hf_to_gguf.py's F32 GGUF
  orion fp32 (ort)     orion serve --engine onnxruntime on the safetensors checkpoint: its fp32 ONNX export,
                       made once before the rounds (timed, like llama.cpp's conversion, and not in the rounds)
  orion fp32 (torch)   orion serve on the safetensors checkpoint (torch engine, the default for checkpoints)
  llama.cpp Q4_0       the F32 GGUF through llama-quantize Q4_0
  orion q4 (ort)       orion quantize --level q4 --method rtn, served by onnxruntime
  orion q4 (torch)     the same directory on the torch engine (--engine torch): torch's int4 kernel
  llama.cpp BF16       llama-server on convert_hf_to_gguf.py's BF16 GGUF
  orion bf16 (torch)   orion serve --dtype bfloat16 on the safetensors checkpoint (torch engine; float32,
                       with a note, on a CPU without native bfloat16 matrix instructions)

`--prompt-words N` puts N words of text before the question, for decoding at
long contexts (the context per request grows to fit).

Each request is a streamed chat completion through the openai client, greedy,
exactly --tokens tokens (ignore_eos), counted from the final `usage` chunk.
"1 stream": median tokens/s of --repeats sequential requests; "8 clients":
total tokens / wall time of 8 concurrent clients, --per-client requests each.
Peak memory is the resident set of the server's whole process tree, sampled.
The load average (1 min) is printed before each measurement: llama.cpp
collapses when its two threads share the cores, so run this on a quiet machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from orion_cli.modeldir import inspect_model_dir
from orion_cli.serve.onnx_cache import float_model_for

from llama_cpp import convert_command, tool
from measure import concurrently
from server_process import ServerProcess

QUESTION = "Write a Python function that parses a CSV file and returns the rows."
MESSAGES = [{"role": "user", "content": QUESTION}]  # --prompt-words puts a longer text before the question


def long_prompt(words: int) -> list[dict[str, str]]:
    """A chat whose user message carries `words` words of Python's own documentation before the question."""
    import pydoc

    text = " ".join(pydoc.render_doc(str, renderer=pydoc.plaintext).split())
    while len(text.split()) < words:
        text += " " + text
    return [{"role": "user", "content": " ".join(text.split()[:words]) + "\n\n" + QUESTION}]
SYSTEMS = ("llama.cpp F32", "orion fp32 (ort)", "orion fp32 (torch)", "llama.cpp Q4_0", "orion q4 (ort)",
           "orion q4 (torch)", "llama.cpp BF16", "orion bf16 (torch)")
PEERS = {"llama.cpp F32": "orion fp32", "llama.cpp Q4_0": "orion q4", "llama.cpp BF16": "orion bf16"}


def build_88m(path: Path) -> Path:
    from bench_serve import build_model

    return build_model(path, vocab_size=2048)


def artifacts(model: Path, workdir: Path) -> dict[str, Path]:
    """The GGUFs and orion's q4 directory of `model`, made once and cached in `workdir`."""
    f32, q4_0, orion_q4 = workdir / "model-f32.gguf", workdir / "model-q4_0.gguf", workdir / "orion-q4"
    bf16 = workdir / "model-bf16.gguf"
    for gguf, outtype in ((f32, "f32"), (bf16, "bf16")):
        if not gguf.is_file():
            subprocess.run(convert_command(model, gguf, outtype), check=True, stdout=subprocess.DEVNULL)
    if not q4_0.is_file():
        subprocess.run([str(tool("llama-quantize")), str(f32), str(q4_0), "Q4_0"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not (orion_q4 / "quantized" / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "orion_cli", "quantize", "-m", str(model), "-o", str(orion_q4),
                        "--level", "q4", "--method", "rtn", "--force"], check=True, stdout=subprocess.DEVNULL)
    cache = workdir / "cache"  # XDG_CACHE_HOME of the fp32 (ort) servers: orion's cache is cache/orion
    started = time.perf_counter()
    exported = float_model_for(inspect_model_dir(model), cache / "orion")
    print(f"orion fp32 ONNX export: {exported.path} ({time.perf_counter() - started:.1f} s, 0 if it was cached)",
          file=sys.stderr)
    return {"f32": f32, "bf16": bf16, "q4_0": q4_0, "orion_q4": orion_q4, "cache": cache}


# -- servers ---------------------------------------------------------------------------------------------------


class LlamaServer:
    def __init__(self, gguf: Path, slots: int, context: int):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [str(tool("llama-server")), "-m", str(gguf), "-np", str(slots), "-t", "2", "-c", str(slots * context),
             "--port", str(self.port), "--host", "127.0.0.1", "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = gguf.name  # llama-server answers to any model name
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("llama-server exited while starting")
            time.sleep(0.3)
        raise RuntimeError("llama-server did not become healthy")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class OrionServer:
    def __init__(self, model: Path, *args: str, workdir: Path, env: dict[str, str] | None = None):
        self.server = ServerProcess(model, "--port", "0", "--max-batch-size", "8", "--max-model-len", str(CONTEXT),
                                    *args, cwd=workdir, env=env).start()
        self.server.wait_ready(600)
        self.url = self.server.url
        self.model = httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"]

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def stop(self) -> None:
        self.server.stop()
        self.server.kill_leftovers()


class PeakMemory:
    """Resident bytes of a process and all its children, sampled every 0.2 s until stopped."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while self.running:
            total = 0
            try:
                for member in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += member.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


# -- clients ---------------------------------------------------------------------------------------------------


def chat(server, tokens: int) -> tuple[int, float]:
    """(completion tokens from usage, seconds) of one streamed greedy chat completion through the openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    seconds = time.perf_counter() - started
    if usage is None or usage.completion_tokens != tokens:
        raise RuntimeError(f"{server.url}: asked for {tokens} tokens, usage says {usage}")
    return usage.completion_tokens, seconds


def single_stream(server, tokens: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        count, seconds = chat(server, tokens)
        rates.append(count / seconds)
    return statistics.median(rates)


def concurrent(server, tokens: int, clients: int, per_client: int) -> float:
    """Aggregate tokens/s of `clients` concurrent clients, `per_client` requests each (a failed one raises)."""
    counts, seconds = concurrently(clients, lambda i: sum(chat(server, tokens)[0] for _ in range(per_client)))
    return sum(counts) / seconds


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    single: list[float] = field(default_factory=list)
    clients: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


def start(system: str, model: Path, files: dict[str, Path], workdir: Path, context: int):
    if system == "llama.cpp F32":
        return LlamaServer(files["f32"], 8, context)
    if system == "llama.cpp Q4_0":
        return LlamaServer(files["q4_0"], 8, context)
    if system == "llama.cpp BF16":
        return LlamaServer(files["bf16"], 8, context)
    if system == "orion bf16 (torch)":
        return OrionServer(model, "--dtype", "bfloat16", workdir=workdir)
    if system == "orion fp32 (ort)":
        return OrionServer(model, "--engine", "onnxruntime", workdir=workdir,
                           env={"XDG_CACHE_HOME": str(files["cache"])})
    if system == "orion fp32 (torch)":
        return OrionServer(model, workdir=workdir)
    if system == "orion q4 (ort)":
        return OrionServer(files["orion_q4"], "--engine", "onnxruntime", workdir=workdir)
    return OrionServer(files["orion_q4"], "--engine", "torch", workdir=workdir)


def run(args, model: Path) -> dict[str, Figures]:
    workdir = args.workdir / f"peer-{model.name}"  # beside the model, never inside it
    workdir.mkdir(parents=True, exist_ok=True)
    files = artifacts(model, workdir)
    systems = [s for s in SYSTEMS if not args.systems or s in args.systems.split(",")]
    figures = {system: Figures() for system in systems}
    context = CONTEXT
    for round_index in range(args.rounds):
        for system in systems:
            for what in ("single", "clients"):  # a fresh server per measurement
                load = os.getloadavg()[0]
                server = start(system, model, files, workdir, context)
                memory = PeakMemory(server.pid)
                try:
                    chat(server, 4)  # warm-up
                    if what == "single":
                        value = single_stream(server, args.tokens, args.repeats)
                    else:
                        value = concurrent(server, args.tokens, 8, args.per_client)
                finally:
                    peak = memory.stop()
                    server.stop()
                getattr(figures[system], what).append(value)
                figures[system].peak.append(peak)
                figures[system].loads.append(load)
                print(f"round {round_index + 1} {system:18s} {what:8s} {value:7.1f} tok/s  peak "
                      f"{peak / 2**20:6.0f} MiB  load {load:.2f}", file=sys.stderr, flush=True)
    return figures


def table(model: Path, figures: dict[str, Figures]) -> str:
    def median(values):
        return statistics.median(values) if values else float("nan")

    lines = [f"model: {model} ({model.name})", "",
             "| system | 1 stream tok/s | 8 clients tok/s | peak MiB | vs peer (1 stream / 8 clients) | load |",
             "|---|---|---|---|---|---|"]
    for system, fig in figures.items():
        peer = next((p for p, ours in PEERS.items() if system.startswith(ours)), None)
        ratio = ""
        if peer in figures:
            ratio = (f"{median(fig.single) / median(figures[peer].single):.2f}× / "
                     f"{median(fig.clients) / median(figures[peer].clients):.2f}×")
        lines.append(f"| {system} | {median(fig.single):.1f} | {median(fig.clients):.1f} | "
                     f"{max(fig.peak) / 2**20:.0f} | {ratio} | {min(fig.loads):.2f}–{max(fig.loads):.2f} |")
    return "\n".join(lines)


CONTEXT = 512  # positions per request (llama-server: per slot); --prompt-words raises it


def main(args) -> int:
    global MESSAGES, CONTEXT
    if args.prompt_words:
        MESSAGES = long_prompt(args.prompt_words)
        CONTEXT = 512 + 4 * args.prompt_words  # a word is two to three and a half tokens of these tokenizers
    if args.model == "88m":
        model = build_88m(args.workdir / "llama-88m")
    elif args.model == "tinyllama":
        model = Path.home() / ".cache" / "orion-bench" / "tinyllama-1.1b"
        if not (model / "config.json").is_file():
            raise SystemExit(f"{model}: write it first with python benchmarks/real_shapes.py")
    else:
        model = Path(args.model)
    figures = run(args, model)
    text = table(model, figures)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({s: f.__dict__ for s, f in figures.items()}, indent=2))
    return 0
