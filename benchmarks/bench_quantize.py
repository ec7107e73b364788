"""orion quantize on the reference model: fp32 ONNX, q4, q3, q2 and the peer path, side by side.

The peer path is what a user does by hand with the same libraries:

    optimum-cli export onnx --model REF --task text-generation-with-past DIR
    python -m onnxruntime.quantization.matmul_nbits_quantizer --input_model DIR/model.onnx --output_model PEER/model.onnx

(its defaults: 4 bits, blocks of 32, symmetric round-to-nearest, MatMul only, so
the embedding stays fp32). Both paths start from the safetensors checkpoint and
are timed as separate processes, export included.

Every model is scored on the same windows of the reference model's held-out
split against the fp32 ONNX export: perplexity change, KL(fp32 || model) and
top-1 agreement. Sizes are fractions of the fp32 safetensors checkpoint. Decode
speed is greedy generation with the KV cache in a bare onnxruntime loop (one
thread, the prompt's prefill excluded), best of --repeats rounds in which the
models take turns, as a ratio to fp32.

--sweep adds the measurements behind the per-level algorithm choice (every
method at 4 and 2 bits, KL against fp32); --rss measures the peak RSS of
`orion quantize` with and without --low-cpu-mem, each in its own process.

    python benchmarks/bench_quantize.py                    # the side-by-side table
    python benchmarks/bench_quantize.py --sweep --rss --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

BIN = Path(sys.executable).parent
LEVELS = ("q4", "q3", "q2")
SWEEP_METHODS = ("rtn", "kquant", "hqq", "gptq")
PROMPT = "import os\n\n\ndef main():\n"


def reference_model() -> Path:
    from orion_cli.config import load_config
    from orion_cli.reference import ensure_reference_model

    return ensure_reference_model(load_config().cache_path)


def onnx_bytes(directory: Path) -> int:
    """model.onnx and its external data, whatever the writer named it (model.onnx_data, model.onnx.data)."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and ".onnx" in p.name)


def run_timed(command: list[str]) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
    return time.perf_counter() - started


def peer_path(model: Path, root: Path) -> tuple[Path, Path, float]:
    """(fp32 export dir, peer quantized dir, seconds for both steps)."""
    from orion_cli.modeldir import copy_support_files

    fp32, peer = root / "peer-fp32", root / "peer-q4"
    seconds = run_timed([str(BIN / "optimum-cli"), "export", "onnx", "--model", str(model),
                         "--task", "text-generation-with-past", str(fp32)])
    peer.mkdir()
    seconds += run_timed([sys.executable, "-m", "onnxruntime.quantization.matmul_nbits_quantizer",
                          "--input_model", str(fp32 / "model.onnx"), "--output_model", str(peer / "model.onnx")])
    copy_support_files(model, peer)
    return fp32, peer, seconds


def orion_level(model: Path, out: Path, level: str, method: str = "auto", keep: bool = False) -> tuple[dict, float]:
    """Run `orion quantize` as its own process; return its metadata and wall time."""
    command = [sys.executable, "-m", "orion_cli", "quantize", "--model", str(model), "--output", str(out),
               "--level", level, "--method", method, "--json"]
    if keep:
        command.append("--keep-intermediate")
    seconds = run_timed(command)
    return json.loads((out / "metadata.json").read_text()), seconds


def eval_windows(model: Path, tokens: int) -> np.ndarray:
    from transformers import AutoTokenizer

    from orion_cli.quantize.texts import plan_texts

    tokenizer = AutoTokenizer.from_pretrained(model)
    return plan_texts(tokenizer, model, None, 0, tokens, 128).evaluation


def quality(fp32_model: Path, candidate: Path, windows: np.ndarray) -> dict:
    from orion_cli.quantize.evaluate import OnnxLM, compare

    return compare(OnnxLM(fp32_model), OnnxLM(candidate), windows).as_dict()


class GreedyDecoder:
    """Greedy decoding with past key values, one token per step, in onnxruntime on one thread."""

    def __init__(self, model_path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values")]
        self.present = [n.replace("past_key_values", "present") for n in self.past]

    def _step(self, ids: np.ndarray, start: int, cache: list[np.ndarray]):
        length = start + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(start, length, dtype=np.int64)[None]
        feeds.update(zip(self.past, cache))
        result = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        return result["logits"], [result[n] for n in self.present]

    def tokens_per_second(self, prompt_ids: list[int], new_tokens: int) -> float:
        """Decode speed after the prompt's prefill (which is not timed)."""
        shape = lambda n: (1, self.inputs[n].shape[1], 0, self.inputs[n].shape[3])  # noqa: E731
        logits, cache = self._step(np.array([prompt_ids], np.int64), 0, [np.zeros(shape(n), np.float32) for n in self.past])
        position = len(prompt_ids)
        started = time.perf_counter()
        for _ in range(new_tokens):
            token = np.array([[int(logits[0, -1].argmax())]], np.int64)
            logits, cache = self._step(token, position, cache)
            position += 1
        return new_tokens / (time.perf_counter() - started)


def decode_speeds(paths: list[Path], prompt_ids: list[int], new_tokens: int, repeats: int) -> list[float]:
    """Best tokens/s of each model over `repeats` rounds, the models taking turns within each round,
    so that load from other processes on a shared machine falls on all of them alike."""
    decoders = [GreedyDecoder(path) for path in paths]
    best = [0.0] * len(paths)
    for _ in range(repeats):
        for index, decoder in enumerate(decoders):
            best[index] = max(best[index], decoder.tokens_per_second(prompt_ids, new_tokens))
    return best


def with_accuracy_level(model_dir: Path, target: Path, level: int) -> Path:
    """A copy of a MatMulNBits model with every node's accuracy_level set to `level`."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_dir / "model.onnx"))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    target.mkdir()
    onnx.save_model(model, str(target / "model.onnx"))
    return target


def side_by_side(model: Path, root: Path, args) -> list[dict]:
    from transformers import AutoTokenizer

    from orion_cli.modeldir import inspect_model_dir

    source_bytes = inspect_model_dir(model).weight_bytes
    windows = eval_windows(model, args.eval_tokens)
    prompt_ids = AutoTokenizer.from_pretrained(model)(PROMPT, add_special_tokens=False)["input_ids"]
    rows = []
    runs = {}
    for level in LEVELS:
        print(f"orion quantize --level {level} ...", file=sys.stderr)
        runs[level] = orion_level(model, root / level, level, keep=level == "q4")
    fp32_dir = root / "q4" / "onnx"
    print("peer path (optimum-cli + matmul_nbits_quantizer) ...", file=sys.stderr)
    _, peer_dir, peer_seconds = peer_path(model, root)
    candidates = [("fp32 ONNX", fp32_dir, None, None)]
    candidates += [(f"orion {level}", root / level / "quantized", runs[level][1], runs[level][0]) for level in LEVELS]
    candidates.append(("peer q4 (defaults)", peer_dir, peer_seconds, None))
    candidates.append(("orion q4, accuracy_level 0", with_accuracy_level(root / "q4" / "quantized", root / "q4-acc0", 0),
                       None, None))
    print("measuring decode speed ...", file=sys.stderr)
    speeds = decode_speeds([c[1] / "model.onnx" for c in candidates], prompt_ids, args.new_tokens, args.repeats)
    fp32_speed = speeds[0]
    for (name, directory, seconds, metadata), speed in zip(candidates, speeds):
        print(f"measuring {name} ...", file=sys.stderr)
        figures = quality(fp32_dir / "model.onnx", directory / "model.onnx", windows)
        size = onnx_bytes(directory)
        if name.endswith("accuracy_level 0"):
            size = onnx_bytes(root / "q4" / "quantized")
        rows.append({
            "model": name,
            "bytes": size,
            "fraction_of_safetensors": round(size / source_bytes, 4),
            "reduction_percent": round(100 * (1 - size / source_bytes), 2),
            "bits": metadata["quantization"]["bits"] if metadata else None,
            "method": metadata["quantization"]["method"] if metadata else None,
            "perplexity": round(figures["perplexity"], 4),
            "perplexity_change_percent": round(100 * figures["perplexity_change"], 3),
            "kl_divergence": round(figures["kl_divergence"], 6),
            "top1_agreement": round(figures["top1_agreement"], 4),
            "quantize_seconds": round(seconds, 2) if seconds else None,
            "decode_tokens_per_second": round(speed, 1),
            "decode_vs_fp32": round(speed / fp32_speed, 3),
        })
    return rows


def sweep(model: Path, root: Path, args) -> list[dict]:
    """KL against fp32 of every method at 4 and 2 bits, the rest of the recipe unchanged."""
    from orion_cli.quantize import quantize_model

    rows = []
    for level in ("q4", "q2"):
        for method in SWEEP_METHODS:
            print(f"sweep: {level} {method} ...", file=sys.stderr)
            started = time.perf_counter()
            result = quantize_model(model, root / f"sweep-{level}-{method}", level, method=method, test=True,
                                    eval_tokens=args.eval_tokens)
            q = result.metadata["quality"]
            rows.append({
                "level": level, "method": method,
                "embedding_method": result.metadata["quantization"]["embedding_method"],
                "bytes": result.metadata["sizes"]["quantized_bytes"],
                "perplexity_change_percent": round(100 * q["perplexity_change"], 3),
                "kl_divergence": round(q["kl_divergence"], 6),
                "top1_agreement": round(q["top1_agreement"], 4),
                "seconds": round(time.perf_counter() - started, 1),
            })
    return rows


def embedding_alone(model: Path, root: Path) -> list[dict]:
    """KL against fp32 with only the token embedding quantized, by each method that fits GatherBlockQuantized.

    The sweep above changes the embedding and the linear layers together; this
    isolates the embedding's method (GPTQ needs layer inputs, which a Gather has
    not, so only the calibration-free methods compete there).
    """
    import onnx
    from transformers import AutoTokenizer

    from orion_cli.modeldir import inspect_model_dir
    from orion_cli.quantize.blockwise import quantize_weight
    from orion_cli.quantize.export import export_onnx
    from orion_cli.quantize.graph import embedding_block_size, find_weight_sites, read_weight
    from orion_cli.quantize.sensitivity import SensitivityProbe
    from orion_cli.quantize.texts import plan_texts

    config = inspect_model_dir(model).config
    fp32 = export_onnx(model, root / "embedding-fp32", config=config)
    graph = onnx.load(str(fp32))
    sites = find_weight_sites(graph, config.get("vocab_size"))
    index = next(i for i, s in enumerate(sites) if s.op == "Gather")
    weight = read_weight(graph, sites[index], fp32.parent)
    texts = plan_texts(AutoTokenizer.from_pretrained(model), model, None, 2048, 0, 128)
    probe = SensitivityProbe(fp32, sites, texts.calibration)
    rows = []
    for bits, block in ((4, 32), (2, 64)):
        for method in ("rtn", "kquant"):
            quantized = quantize_weight(weight, bits, embedding_block_size(sites[index].k, block), method)
            rows.append({"bits": bits, "block_size": block, "embedding_method": method,
                         "kl_divergence": round(probe.kl_with(index, quantized), 6)})
    return rows


RSS_SNIPPET = """
import sys
from orion_cli.quantize import quantize_model
quantize_model(sys.argv[1], sys.argv[2], "q4", method="rtn", low_cpu_mem=sys.argv[3] == "1")
"""
# The reference model (20 MB) is smaller than torch's own footprint, so memory is measured on a
# random-init Llama of ~67M parameters (268 MB in fp32) as well.
RSS_CONFIG = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                  tie_word_embeddings=False)


def random_llama(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orion_cli.reference.tokenizer import corpus_tokenizer as tiny_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**RSS_CONFIG)).save_pretrained(directory, max_shard_size="10GB")
    tiny_tokenizer().save_pretrained(directory)
    return directory


def sampled_peak_rss(command: list[str], interval: float = 0.02) -> dict:
    """Run `command`; sample the resident memory of it and its children until it exits.

    Sampled, not ru_maxrss: on Linux a process's ru_maxrss starts at its parent's
    resident size at fork and survives exec, so children of a large process all
    report the parent's size.
    """
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched = psutil.Process(process.pid)
    peak_total = peak_main = peak_children = 0
    while process.poll() is None:
        try:
            main = watched.memory_info().rss
            children = sum(c.memory_info().rss for c in watched.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_children = max(peak_main, main), max(peak_children, children)
        peak_total = max(peak_total, main + children)
        time.sleep(interval)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return {"total": peak_total, "main": peak_main, "children": peak_children}


def peak_rss(model: Path, root: Path) -> list[dict]:
    """Peak RSS of q4 (rtn, no calibration) with and without low_cpu_mem, each run in a fresh process."""
    from orion_cli.modeldir import inspect_model_dir

    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    rows = []
    for name, directory in (("reference", model), ("random llama 67M", random_llama(root / "rss-model"))):
        for low in (False, True):
            out = root / f"rss-{name.split()[0]}-{int(low)}"
            started = time.perf_counter()
            peak = sampled_peak_rss([sys.executable, "-c", RSS_SNIPPET, str(directory), str(out), "1" if low else "0"])
            rows.append({"model": name, "fp32_mib": mib(inspect_model_dir(directory).weight_bytes),
                         "low_cpu_mem": low, "peak_rss_mib": mib(peak["total"]), "main_process_mib": mib(peak["main"]),
                         "export_child_mib": mib(peak["children"]) if low else None,
                         "seconds": round(time.perf_counter() - started, 1)})
    return rows


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="also measure every method at 4 and 2 bits")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS with and without --low-cpu-mem")
    parser.add_argument("--skip-side-by-side", action="store_true")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()

    model = reference_model()
    results: dict = {"model": str(model)}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        root = Path(tmp)
        if not args.skip_side_by_side:
            results["side_by_side"] = side_by_side(model, root, args)
            print_table(results["side_by_side"])
        if args.sweep:
            results["sweep"] = sweep(model, root, args)
            print_table(results["sweep"])
            results["embedding_alone"] = embedding_alone(model, root)
            print_table(results["embedding_alone"])
        if args.rss:
            results["peak_rss"] = peak_rss(model, root)
            print_table(results["peak_rss"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
