"""orion quantize against its peers: quality on the reference model, and time and memory at real sizes.

Default: the reference model, side by side with what a user does by hand with
the same libraries:

    optimum-cli export onnx --model REF --task text-generation-with-past DIR
    python -m onnxruntime.quantization.matmul_nbits_quantizer --input_model DIR/model.onnx --output_model PEER/model.onnx

(its defaults: 4 bits, blocks of 32, symmetric round-to-nearest, MatMul only, so
the embedding stays fp32). Both paths start from the safetensors checkpoint and
are timed as separate processes, export included. Every model is scored on the
same windows of the reference model's held-out split against the fp32 ONNX
model (orion's --keep-intermediate): perplexity change, KL(fp32 || model) and
top-1 agreement. Decode speed is greedy generation with the KV cache on one
thread, best of --repeats rounds in which the models take turns.

--sweep adds the measurements behind the per-level algorithm choice (every
method at 4 and 2 bits, KL against fp32).

--scale quantizes random-weight bf16 checkpoints of real shapes (TinyLlama
1.1B, Phi-3-mini 3.8B, Llama-3-8B; benchmarks/real_shapes.py writes them
shard by shard into --checkpoints) with orion q4 (default settings, and
--method rtn) and with llama.cpp (convert_hf_to_gguf.py to bf16 GGUF, then
llama-quantize Q4_K_M; benchmarks/llama_cpp.py), taking turns, each as its
own process. Wall time and the sampled peak resident memory of the whole
process tree (benchmarks/measure.py) are reported, and their ratios to
llama.cpp. Outputs are deleted after each measurement (Llama-3-8B's GGUF is 16 GB).

    python benchmarks/bench_quantize.py                    # the side-by-side table
    python benchmarks/bench_quantize.py --sweep --json results.json
    python benchmarks/bench_quantize.py --skip-side-by-side --scale --shapes phi-3-mini
    python benchmarks/bench_quantize.py --frontier         # against llama.cpp's types (quantize_frontier.py)
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # measure, real_shapes, llama_cpp

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
    from orion_cli.onnx_decoder import OnnxDecoder
    from orion_cli.quantize.evaluate import compare_onnx

    return compare_onnx(OnnxDecoder(fp32_model), OnnxDecoder(candidate), windows).as_dict()


def tokens_per_second(decoder, prompt_ids: list[int], new_tokens: int) -> float:
    """Greedy decode speed after the prompt's prefill (which is not timed)."""
    logits, past = decoder.run(np.array([prompt_ids], np.int64), None, None, None)
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        logits, past = decoder.run(token, None, None, past)
    return new_tokens / (time.perf_counter() - started)


def decode_speeds(paths: list[Path], prompt_ids: list[int], new_tokens: int, repeats: int) -> list[float]:
    """Best tokens/s of each model over `repeats` rounds, the models taking turns within each round,
    so that load from other processes on a shared machine falls on all of them alike."""
    from orion_cli.onnx_decoder import OnnxDecoder

    decoders = [OnnxDecoder(path, threads=1) for path in paths]
    best = [0.0] * len(paths)
    for _ in range(repeats):
        for index, decoder in enumerate(decoders):
            best[index] = max(best[index], tokens_per_second(decoder, prompt_ids, new_tokens))
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
            result = quantize_model(model, root / f"sweep-{level}-{method}", level=level, method=method, test=True,
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


# -- --scale: real sizes against llama.cpp ---------------------------------------------------------------

SCALE_SHAPES = ("tinyllama-1.1b", "phi-3-mini", "llama-3-8b")
TOOL_KEYS = {"orion q4 (default)": "default", "orion q4 --method rtn": "rtn", "llama.cpp Q4_K_M": "llama.cpp"}


def scale(args) -> list[dict]:
    import shutil

    from llama_cpp import convert_command, llama_cpp_root, tool
    from measure import run_measured
    from real_shapes import write_random_checkpoint

    rows = []
    have_peer = llama_cpp_root() is not None
    if not have_peer:
        print("llama.cpp is not built: the peer is left out (see benchmarks/llama_cpp.py)", file=sys.stderr)
    for shape in args.shapes.split(","):
        checkpoint = args.checkpoints / shape
        if not (checkpoint / "model.safetensors.index.json").is_file():
            print(f"writing {checkpoint} ...", file=sys.stderr)
            write_random_checkpoint(shape, checkpoint)
        weights = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        work = args.work / shape
        for repeat in range(args.repeats):
            runs = [("orion q4 (default)", []), ("orion q4 --method rtn", ["--method", "rtn"])]
            if have_peer:
                runs.append(("llama.cpp Q4_K_M", None))
            runs = [run for run in runs if TOOL_KEYS[run[0]] in args.tools.split(",")]
            for name, flags in runs:
                if flags == ["--method", "rtn"] and rows and rows[-1]["detail"].get("tokens") == 0:
                    # the default already fell back to round-to-nearest: the same run again measures nothing new
                    print(f"{shape}: {name} skipped (the default run was round-to-nearest)", file=sys.stderr)
                    continue
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                print(f"{shape}: {name} (round {repeat + 1}) ...", file=sys.stderr)
                load = os.getloadavg()[0]
                if flags is not None:
                    steps = [run_measured([sys.executable, "-m", "orion_cli", "quantize", "--model", checkpoint,
                                           "--output", work / "out", *flags], interval=0.2)]
                    detail = json.loads((work / "out" / "metadata.json").read_text())["quantization"]["calibration"]
                else:
                    steps = [run_measured(convert_command(checkpoint, work / "model-bf16.gguf"), interval=0.2),
                             run_measured([tool("llama-quantize"), work / "model-bf16.gguf",
                                           work / "model-Q4_K_M.gguf", "Q4_K_M"], interval=0.2)]
                    detail = {"convert_seconds": round(steps[0].seconds, 1)}
                failed = next((step for step in steps if step.returncode != 0), None)
                if failed is not None and flags is None:  # the peer failing leaves orion's figures standing
                    print(f"{shape} {name} failed:\n{failed.stderr[-3000:]}", file=sys.stderr)
                    continue
                if failed is not None:
                    raise SystemExit(f"{shape} {name} failed:\n{failed.stderr[-3000:]}")
                output = sum(f.stat().st_size for f in work.rglob("*") if f.is_file()
                             and (f.name.endswith(".onnx_data") or f.name.endswith("Q4_K_M.gguf")))
                rows.append({"shape": shape, "weights_gib": round(weights / 2**30, 2), "tool": name,
                             "round": repeat + 1, "seconds": round(sum(s.seconds for s in steps), 1),
                             "peak_gib": round(max(s.peak_bytes for s in steps) / 2**30, 2),
                             "output_gib": round(output / 2**30, 2), "load_before": round(load, 2),
                             "detail": detail})
                print(f"  {rows[-1]}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    if have_peer:
        peers = {(r["shape"], r["round"]): r for r in rows if r["tool"].startswith("llama.cpp")}
        for row in rows:
            peer = peers.get((row["shape"], row["round"]))
            if peer and row is not peer:
                row["time_vs_llama_cpp"] = round(row["seconds"] / peer["seconds"], 2)
                row["peak_vs_llama_cpp"] = round(row["peak_gib"] / peer["peak_gib"], 2)
    return rows


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(c for row in rows for c in row))  # rows may lack columns (the peer's ratios)
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "-")).ljust(widths[c]) for c in columns))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="decode-speed rounds; --scale rounds: 1")
    parser.add_argument("--sweep", action="store_true", help="also measure every method at 4 and 2 bits")
    parser.add_argument("--scale", action="store_true", help="time and peak memory at real sizes vs llama.cpp")
    parser.add_argument("--shapes", default=",".join(SCALE_SHAPES), help="--scale: which (comma-separated)")
    parser.add_argument("--tools", default="default,rtn,llama.cpp", help="--scale: which runs (comma-separated)")
    parser.add_argument("--checkpoints", type=Path, default=Path.home() / ".cache" / "orion-bench",
                        help="--scale: where the random checkpoints are (written when missing)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-quantize-scale",
                        help="--scale: scratch for outputs (needs about 25 GB for Llama-3-8B)")
    parser.add_argument("--skip-side-by-side", action="store_true")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--frontier", action="store_true",
                        help="instead: the (size, perplexity) frontier against llama.cpp's types on a discriminating "
                             "reference model (benchmarks/quantize_frontier.py)")
    parser.add_argument("--steps", type=int, default=1000, help="--frontier: training steps of its reference model")
    args = parser.parse_args()
    if args.frontier:
        import quantize_frontier

        args.workdir = args.work.parent / "bench-quantize-frontier"
        raise SystemExit(quantize_frontier.main(args))

    results: dict = {"load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        root = Path(tmp)
        if not args.skip_side_by_side or args.sweep:
            model = reference_model()
            results["model"] = str(model)
        if not args.skip_side_by_side:
            results["side_by_side"] = side_by_side(model, root, args)
            print_table(results["side_by_side"])
        if args.sweep:
            results["sweep"] = sweep(model, root, args)
            print_table(results["sweep"])
    if args.scale:
        args.repeats = 1 if "--repeats" not in sys.argv else args.repeats
        results["scale"] = scale(args)
        print_table([{k: v for k, v in row.items() if k != "detail"} for row in results["scale"]])
    results["load_average_after"] = os.getloadavg()
    print(f"load average before {results['load_average']}, after {results['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
