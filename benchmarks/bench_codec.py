"""The activation codec side by side with the users' current serialization (JSON, hex), and what each codec
does to generations through a two-stage pipeline.

1. Codecs: activation-shaped fp32 tensors (1x4096 ... 64x8192; Gaussian with a
   few outlier channels 20-60x larger, as LLM hidden states have) through every
   codec and the two baselines of the users' serialization guide: JSON lists of
   floats and hex "binary" inside JSON. Size ratio (bytes on the wire / tensor
   bytes), encode and decode GB/s (tensor bytes per second; medians of repeated
   runs), relative error ||x - y|| / ||x||.
   Targets: int8+zstd <= 0.26x with <= 1.5% error; exact codecs lossless;
   int8 encode+decode >= 1 GB/s.
2. Memory: peak RSS of a child process sending a 256 MiB tensor as one frame
   versus encode_chunks/decode_chunks (4 MiB chunks).
3. Pipeline: the reference model's decoder layers as two in-process stages,
   [0, n/2) and [n/2, n), each with its own KV cache; the hidden states cross
   between them through encode/decode with each codec, for the prefill and every
   decode step. Greedy generations over 20 prompts from the held-out text,
   compared with the uncompressed run (which must equal model.generate):
   identical-token rate, prompts generated identically; teacher-forced on the
   uncompressed continuation: next-token argmax agreement and mean KL.

    python benchmarks/bench_codec.py                      # all three parts, ~5 min on 2 cores
    python benchmarks/bench_codec.py --quick              # fewer shapes, prompts and tokens
    python benchmarks/bench_codec.py --skip-memory --skip-pipeline --json codec.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orion_cli.codec import CODECS, CodecMetrics, decode, encode  # noqa: E402

SHAPES = [(1, 4096), (16, 4096), (64, 4096), (1, 8192), (16, 8192), (64, 8192)]
QUICK_SHAPES = [(1, 4096), (16, 4096), (64, 8192)]


def activation(rows: int, hidden: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator)
    channels = torch.randperm(hidden, generator=generator)[: max(4, hidden // 1024)]
    x[:, channels] *= torch.empty(len(channels)).uniform_(20, 60, generator=generator)
    return x


# -- 1. codecs against the guide's JSON and hex ------------------------------------

def json_encode(array: np.ndarray) -> bytes:
    """The guide's JSON format: the values as a list, with shape and dtype."""
    return json.dumps({"data": array.tolist(), "shape": list(array.shape), "dtype": str(array.dtype)}).encode()


def json_decode(payload: bytes) -> np.ndarray:
    obj = json.loads(payload)
    return np.array(obj["data"], dtype=obj["dtype"]).reshape(obj["shape"])


def hex_encode(array: np.ndarray) -> bytes:
    """The guide's "binary" format: the raw bytes as hex text inside JSON."""
    return json.dumps({"__binary__": True, "data": array.tobytes().hex(), "shape": list(array.shape),
                       "dtype": str(array.dtype)}).encode()


def hex_decode(payload: bytes) -> np.ndarray:
    obj = json.loads(payload)
    return np.frombuffer(bytes.fromhex(obj["data"]), dtype=obj["dtype"]).reshape(obj["shape"])


def timed(function, argument, min_seconds: float, min_runs: int = 5, max_runs: int = 200):
    """Median seconds of repeated calls (after one warm-up) and the last result."""
    result = function(argument)
    times: list[float] = []
    while len(times) < min_runs or (sum(times) < min_seconds and len(times) < max_runs):
        start = time.perf_counter()
        result = function(argument)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def codec_table(shapes, min_seconds: float) -> list[dict]:
    rows = []
    metrics = CodecMetrics()  # keep the module's METRICS out of it; the counters cost the same either way
    for shape in shapes:
        x = activation(*shape)
        array = x.numpy()
        nbytes = array.nbytes
        candidates = {codec: (lambda t, c=codec: encode(t, c, metrics=metrics),
                              lambda f: decode(f, metrics=metrics), x) for codec in CODECS}
        candidates["guide JSON"] = (json_encode, json_decode, array)
        candidates["guide hex"] = (hex_encode, hex_decode, array)
        for name, (encoder, decoder, source) in candidates.items():
            slow = name in ("json", "guide JSON")
            encode_s, frame = timed(encoder, source, min_seconds, min_runs=3 if slow else 5)
            decode_s, decoded = timed(decoder, frame, min_seconds, min_runs=3 if slow else 5)
            decoded = torch.as_tensor(np.asarray(decoded)) if not isinstance(decoded, torch.Tensor) else decoded
            error = ((decoded.float() - x).norm() / x.norm()).item()
            rows.append({
                "shape": f"{shape[0]}x{shape[1]}", "codec": name, "ratio": len(frame) / nbytes,
                "encode_gb_s": nbytes / encode_s / 1e9, "decode_gb_s": nbytes / decode_s / 1e9,
                "roundtrip_gb_s": nbytes / (encode_s + decode_s) / 1e9, "relative_error": error,
            })
            print(f"  {rows[-1]['shape']:8s} {name:11s} ratio {rows[-1]['ratio']:.4f}  "
                  f"enc {rows[-1]['encode_gb_s']:7.3f} GB/s  dec {rows[-1]['decode_gb_s']:7.3f} GB/s  "
                  f"err {error:.2e}", file=sys.stderr)
    return rows


def print_codec_table(rows: list[dict]) -> None:
    print("\n## Codecs on activation-shaped fp32 tensors (ratio = frame bytes / tensor bytes)\n")
    print("| shape | codec | size ratio | encode GB/s | decode GB/s | enc+dec GB/s | relative error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['codec']} | {r['ratio']:.4f} | {r['encode_gb_s']:.3f} | {r['decode_gb_s']:.3f} "
              f"| {r['roundtrip_gb_s']:.3f} | {r['relative_error']:.2e} |")


# -- 2. memory: one frame versus chunks -------------------------------------------

_MEMORY_CHILD = """
import resource, sys, torch
torch.set_num_threads(1)
from orion_cli.codec import decode, decode_chunks, encode, encode_chunks
mode, codec, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = torch.randn(mib * 2**18)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "frame":
    y = decode(encode(x, codec))
else:
    y = decode_chunks(encode_chunks(x, codec, 4 * 2**20))
assert y.shape == x.shape
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - before) / 1024)
"""


def memory_table(mib: int) -> list[dict]:
    rows = []
    for codec in ("raw", "zstd", "int8+zstd"):
        row = {"codec": codec, "tensor_mib": mib}
        for mode in ("frame", "chunks"):
            out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, mode, codec, str(mib)],
                                 check=True, capture_output=True, text=True)
            row[f"{mode}_extra_mib"] = float(out.stdout.strip())
        rows.append(row)
        print(f"  memory {codec}: {row}", file=sys.stderr)
    return rows


def print_memory_table(rows: list[dict]) -> None:
    print("\n## Peak memory above the tensor itself, sending and receiving it (MiB)\n")
    print("| codec | tensor | one frame | 4 MiB chunks | chunks / frame |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['codec']} | {r['tensor_mib']} MiB | {r['frame_extra_mib']:.0f} | {r['chunks_extra_mib']:.0f} "
              f"| {r['chunks_extra_mib'] / r['frame_extra_mib']:.2f} |")


# -- 3. generations through a two-stage pipeline ----------------------------------

class TwoStagePipeline:
    """Decoder layers [0, n/2) and [n/2, n) of a Llama as two stages with separate KV caches."""

    def __init__(self, model):
        self.model = model
        n = model.config.num_hidden_layers
        self.split = n // 2
        self.stages = (range(0, self.split), range(self.split, n))

    def _run_layers(self, layers, hidden, positions, cache):
        inner = self.model.model
        position_embeddings = inner.rotary_emb(hidden, positions)
        for index in layers:
            hidden = inner.layers[index](hidden, attention_mask=None, position_ids=positions, past_key_values=cache,
                                         cache_position=positions[0], position_embeddings=position_embeddings)
        return hidden

    def run(self, prompt: torch.Tensor, new_tokens: int, codec: str | None, forced: torch.Tensor | None = None):
        """Greedy tokens and per-step log-probabilities; with `forced`, those tokens are fed instead (teacher forcing).

        Returns (tokens, log_probs, wire_bytes, tensor_bytes).
        """
        from transformers import DynamicCache

        caches = (DynamicCache(config=self.model.config), DynamicCache(config=self.model.config))
        inputs, positions = prompt[None], torch.arange(len(prompt))[None]
        tokens, log_probs, wire, raw = [], [], 0, 0
        for step in range(new_tokens):
            hidden = self._run_layers(self.stages[0], self.model.model.embed_tokens(inputs), positions, caches[0])
            if codec is not None:
                frame = encode(hidden, codec)
                wire, raw = wire + len(frame), raw + hidden.numel() * hidden.element_size()
                hidden = decode(frame)
            hidden = self._run_layers(self.stages[1], hidden, positions, caches[1])
            logits = self.model.lm_head(self.model.model.norm(hidden[:, -1]))[0]
            log_probs.append(torch.log_softmax(logits.double(), dim=-1))
            token = int(logits.argmax()) if forced is None else int(forced[step])
            tokens.append(int(logits.argmax()))
            inputs, positions = torch.tensor([[token]]), positions[:, -1:] + 1
        return tokens, torch.stack(log_probs), wire, raw


def heldout_prompts(model_dir: Path, tokenizer, count: int, length: int) -> list[torch.Tensor]:
    from orion_cli.reference import heldout_text

    ids = tokenizer(heldout_text(model_dir))["input_ids"]
    stride = (len(ids) - length) // count
    return [torch.tensor(ids[i * stride : i * stride + length]) for i in range(count)]


def pipeline_study(prompts: int, prompt_tokens: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orion_cli.config import load_config
    from orion_cli.reference import ensure_reference_model

    model_dir = ensure_reference_model(load_config().cache_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pipeline = TwoStagePipeline(model)
    texts = heldout_prompts(model_dir, tokenizer, prompts, prompt_tokens)

    with torch.inference_mode():
        baseline = []
        for prompt in texts:
            tokens, log_probs, _, _ = pipeline.run(prompt, new_tokens, codec=None)
            reference = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            if reference[0, len(prompt):].tolist() != tokens:
                raise SystemExit("the uncompressed two-stage pipeline does not reproduce model.generate")
            baseline.append((tokens, log_probs))

        results = {}
        for codec in CODECS:
            started = time.perf_counter()
            same_tokens = identical_prompts = agree = 0
            kl_sum, steps, wire, raw, prefixes = 0.0, 0, 0, 0, []
            for prompt, (base_tokens, base_log_probs) in zip(texts, baseline, strict=True):
                tokens, _, sent, carried = pipeline.run(prompt, new_tokens, codec)
                matches = [a == b for a, b in zip(tokens, base_tokens, strict=True)]
                same_tokens += sum(matches)
                identical_prompts += all(matches)
                prefixes.append(matches.index(False) if not all(matches) else len(matches))
                wire, raw = wire + sent, raw + carried
                forced_tokens, log_probs, _, _ = pipeline.run(prompt, new_tokens, codec, forced=base_tokens)
                agree += sum(a == b for a, b in zip(forced_tokens, base_tokens, strict=True))
                kl = (base_log_probs.exp() * (base_log_probs - log_probs)).sum(dim=-1)
                kl_sum, steps = kl_sum + kl.sum().item(), steps + len(kl)
            results[codec] = {
                "identical_token_rate": same_tokens / (len(texts) * new_tokens),
                "identical_generations": identical_prompts,
                "mean_identical_prefix": statistics.mean(prefixes),
                "argmax_agreement": agree / steps,
                "mean_kl": kl_sum / steps,
                "wire_ratio": wire / raw,
                "seconds": time.perf_counter() - started,
            }
            print(f"  pipeline {codec:10s} {results[codec]}", file=sys.stderr)
    return {"prompts": len(texts), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers,
            "split_at_layer": pipeline.split, "codecs": results}


def print_pipeline(study: dict) -> None:
    print(f"\n## Greedy generations through two stages (layers [0,{study['split_at_layer']}) and "
          f"[{study['split_at_layer']},{study['layers']})), {study['prompts']} held-out prompts of "
          f"{study['prompt_tokens']} tokens, {study['new_tokens']} new tokens each\n")
    print("| codec | identical tokens | identical generations | mean identical prefix | argmax agreement "
          "(teacher-forced) | mean KL (nats) | wire bytes / tensor bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for codec, r in study["codecs"].items():
        print(f"| {codec} | {r['identical_token_rate']:.2%} | {r['identical_generations']}/{study['prompts']} "
              f"| {r['mean_identical_prefix']:.1f} | {r['argmax_agreement']:.2%} | {r['mean_kl']:.2e} "
              f"| {r['wire_ratio']:.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 shapes, 5 prompts, 16 new tokens, 64 MiB memory test")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads wait on each other)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.new_tokens = min(args.prompts, 5), min(args.new_tokens, 16)

    report: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "torch": torch.__version__, "load_average": os.getloadavg()}}
    if not args.skip_table:
        report["codecs"] = codec_table(QUICK_SHAPES if args.quick else SHAPES, 0.05 if args.quick else 0.3)
        print_codec_table(report["codecs"])
    if not args.skip_memory:
        report["memory"] = memory_table(64 if args.quick else 256)
        print_memory_table(report["memory"])
    if not args.skip_pipeline:
        report["pipeline"] = pipeline_study(args.prompts, args.prompt_tokens, args.new_tokens)
        print_pipeline(report["pipeline"])
    report["machine"]["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
