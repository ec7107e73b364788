"""The (size, perplexity) frontier: orion's levels against llama.cpp's types, on a discriminating reference model.

`python benchmarks/bench_quantize.py --frontier` (issue 14's measurement).

The built-in reference model is trained so briefly that 2-bit round-to-nearest
barely hurts it; a quantizer tuned on it looks done while failing real models.
This benchmark trains a second, benchmark-only one from the same recipe for
--steps steps (cached beside the built-in one) and first checks that it
discriminates: round-to-nearest q2 in blocks of 32 must cost it at least +20%
perplexity (printed; the run goes on either way, saying so).

Then, on the same held-out token windows (ids, never text):
  - fp32 (transformers), the baseline;
  - orion quantize q4, q3, q2 (default settings), and q2 with --size-budget 0.125 (Q2_K's size here);
  - the check above: every weight matrix (embedding and head included) round-to-nearest at 2 bits in blocks
    of 32 (onnxruntime's kernel, dequantized into transformers' model: orion's levels now mix formats);
  - llama.cpp: convert_hf_to_gguf.py to F32, llama-quantize to Q4_0, Q4_K_M, Q3_K_S, Q3_K_M, Q2_K and
    IQ2_XXS, each without and with an importance matrix (llama-imatrix on the calibration text; IQ2_XXS
    needs one), scored through llama.cpp's own library (the llama-cpp-python sources' ctypes bindings over
    the libllama this build made), every position of every window.
Size is every byte of the model's files (ONNX graph and data; the GGUF) over the fp32 weights' bytes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from llama_cpp import convert_command, llama_cpp_root, tool

LLAMA_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_S", "Q3_K_M", "Q2_K", "IQ2_XXS")
# q2 also at llama.cpp Q2_K's size on this model (0.125x: its output tensor is Q6_K), beside the level's 0.10x
ORION_RUNS = (("q4", []), ("q3", []), ("q2", []), ("q2 --size-budget 0.125", ["--size-budget", "0.125"]))
DISCRIMINATION = 0.20  # round-to-nearest q2 at block 32 must cost at least this much perplexity


def discriminating_model(steps: int) -> Path:
    from orion_cli.config import load_config
    from orion_cli.reference import ensure_reference_model
    from orion_cli.reference.model import Recipe

    recipe = Recipe()
    # more text too, so the longer run sees new tokens rather than the same 4 MB five times over
    recipe = replace(recipe, steps=steps, warmup_steps=max(recipe.warmup_steps, steps // 10),
                     train_bytes=max(recipe.train_bytes, 16_000_000))
    return ensure_reference_model(load_config().cache_path, recipe)


def rtn_q2_logits(model_dir: Path):
    """transformers' model with every 2-D weight replaced by its 2-bit, block-32 round-to-nearest version."""
    import torch

    from orion_cli.quantize.blockwise import quantize_weight

    def round_weights(model) -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2 and parameter.shape[1] % 32 == 0:  # [out, in]: blocks along the inputs
                    rounded = quantize_weight(parameter.numpy().T, 2, 32, "rtn").dequantize()
                    parameter.copy_(torch.from_numpy(rounded.T))

    return hf_logits(model_dir, round_weights)


def mean_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """(sum of -log p(target), count) for logits [N, T, V] and targets [N, T]."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(-1))
    picked = np.take_along_axis(shifted, targets[..., None], -1)[..., 0]
    return float((log_z - picked).sum()), targets.size


def perplexity_of(logits_of, windows: np.ndarray, batch: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        nll, n = mean_nll(logits_of(chunk[:, :-1]), chunk[:, 1:])
        total, count = total + nll, count + n
    return math.exp(total / count)


def hf_logits(model_dir: Path, prepare=None):
    """transformers' logits for [n, T] ids; `prepare(model)` may change the model first."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if prepare is not None:
        prepare(model)

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(ids)).logits.numpy()

    return run


def onnx_logits(model_dir: Path):
    from orion_cli.onnx_decoder import OnnxDecoder

    return OnnxDecoder(model_dir / "model.onnx").logits


def llama_perplexity(gguf: Path, windows: np.ndarray, work: Path) -> float:
    """Through libllama, in a child process (llama-cpp-python's package is also named llama_cpp)."""
    np.save(work / "windows.npy", windows)
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("llama_cpp_score.py")), str(gguf),
                           str(work / "windows.npy"), str(llama_cpp_root())], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"scoring {gguf.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return math.exp(result["nll"] / result["count"])


def fp32_bytes_of(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "np") as handle:
            total += sum(int(np.prod(handle.get_slice(k).get_shape())) for k in handle.keys())
    return 4 * total


def files_bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def run(args) -> list[dict]:
    from bench_quantize import eval_windows

    model = discriminating_model(args.steps)
    work = args.workdir / f"frontier-{model.name}"
    work.mkdir(parents=True, exist_ok=True)
    windows = eval_windows(model, args.eval_tokens)
    fp32_bytes = fp32_bytes_of(model)
    rows = []
    base = perplexity_of(hf_logits(model), windows)
    rows.append({"system": "fp32 (transformers)", "size": 1.0, "perplexity": base, "change": 0.0})
    print(f"fp32: perplexity {base:.3f} on {windows.shape[0]} windows of {windows.shape[1]}", file=sys.stderr)
    ppl = perplexity_of(rtn_q2_logits(model), windows)
    rows.append({"system": "2-bit round-to-nearest, blocks of 32 (the check)", "size": None, "perplexity": ppl,
                 "change": ppl / base - 1, "note": "not stored: a simulation in transformers"})
    print(rows[-1], file=sys.stderr, flush=True)
    for name, extra in ORION_RUNS:
        level = name.split()[0]
        out = work / f"orion-{name.replace(' ', '-').replace('/', '').replace('--', '')}"
        if not (out / "quantized" / "model.onnx").is_file():
            subprocess.run([sys.executable, "-m", "orion_cli", "quantize", "-m", str(model), "-o", str(out),
                            "--level", level, "--force", *extra], check=True, stdout=subprocess.DEVNULL)
        ppl = perplexity_of(onnx_logits(out / "quantized"), windows)
        size = files_bytes(p for p in (out / "quantized").iterdir() if ".onnx" in p.name) / fp32_bytes
        rows.append({"system": f"orion {name}", "size": size, "perplexity": ppl, "change": ppl / base - 1})
        print(rows[-1], file=sys.stderr, flush=True)
    if llama_cpp_root() is None:
        print("llama.cpp is not built: its types are left out (see benchmarks/llama_cpp.py)", file=sys.stderr)
        return rows
    f32 = work / "model-f32.gguf"
    if not f32.is_file():
        subprocess.run(convert_command(model, f32, "f32"), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        calibration = work / "calibration.txt"
        from orion_cli.reference.corpus import corpus_text

        calibration.write_text(corpus_text("train", 400_000))
        subprocess.run([str(tool("llama-imatrix")), "-m", str(f32), "-f", str(calibration), "-o", str(imatrix),
                        "-c", "128", "-t", "2"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for kind in LLAMA_TYPES:
        for with_imatrix in (False, True):
            gguf = work / f"model-{kind}{'-imatrix' if with_imatrix else ''}.gguf"
            label = f"llama.cpp {kind}{' + imatrix' if with_imatrix else ''}"
            if not gguf.is_file():
                command = [str(tool("llama-quantize"))] + (["--imatrix", str(imatrix)] if with_imatrix else []) \
                    + [str(f32), str(gguf), kind, "2"]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    rows.append({"system": label, "size": None, "perplexity": None, "change": None,
                                 "note": done.stderr.strip().splitlines()[-1][:120]})
                    print(rows[-1], file=sys.stderr, flush=True)
                    continue
            ppl = llama_perplexity(gguf, windows, work)
            rows.append({"system": label, "size": gguf.stat().st_size / fp32_bytes, "perplexity": ppl,
                         "change": ppl / base - 1})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(args) -> int:
    rows = run(args)
    rtn = next((r for r in rows if r["system"].startswith("2-bit round-to-nearest")), None)
    print("| system | size / fp32 | perplexity | change |\n|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["size"] is None, r["size"] or 0)):
        if row["size"] is None and row["perplexity"] is not None:
            print(f"| {row['system']} | – | {row['perplexity']:.3f} | {row['change']:+.1%} |")
        elif row["size"] is None:
            print(f"| {row['system']} | – | – | {row.get('note', '')} |")
        else:
            print(f"| {row['system']} | {row['size']:.3f}× | {row['perplexity']:.3f} | {row['change']:+.1%} |")
    if rtn is not None:
        verdict = "discriminates" if rtn["change"] >= DISCRIMINATION else "does NOT discriminate"
        print(f"\nround-to-nearest q2 at block 32 costs {rtn['change']:+.1%}: the model {verdict} "
              f"(needs >= +{DISCRIMINATION:.0%})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
