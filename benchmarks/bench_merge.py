"""orion merge against mergekit-yaml, side by side, and what each merge method does to quality.

Speed and memory: random-init Llamas of ~270 MB (fp32) are built here; each
method is run as `orion merge --models ... ` and as `mergekit-yaml` on the
mergekit_config.yml orion wrote (the same merge, bit for bit). Every command is
its own process, reaped with wait4(), so its wall time and peak RSS are its own.
Runs alternate between the two tools; medians of --repeats runs are reported.
Targets: orion within 5% of mergekit's time and no more memory.

Quality: two variants of the reference model are fine-tuned on disjoint halves
of its corpus (the stdlib's top-level packages, alphabetically, split at half the
bytes), merged with each method, and every model's perplexity is measured on the
held-out files of both halves, next to the base's and each parent's.

    python benchmarks/bench_merge.py                       # both studies
    python benchmarks/bench_merge.py --skip-quality --repeats 5 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BIN = Path(sys.executable).parent
# ~67M parameters: 268 MB per model in fp32.
BENCH_CONFIG = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                    num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                    tie_word_embeddings=False)
TRAIN_BYTES = 2_000_000  # source text each fine-tune samples from
SPEED_METHODS = {
    "linear": ["--models", "{a}", "{b}", "--ratios", "0.6", "0.4"],
    "ties": ["--models", "{base}", "{a}", "{b}", "--ratios", "0", "0.5", "0.5", "--method", "ties"],
    "dare": ["--models", "{base}", "{a}", "{b}", "--ratios", "0", "0.5", "0.5", "--method", "dare", "--seed", "1"],
}


# -- speed and memory ------------------------------------------------------------


def build_models(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch
    from orion_cli.reference.tokenizer import corpus_tokenizer as tiny_tokenizer

    tokenizer = tiny_tokenizer()
    models = {}
    for seed, name in enumerate(("base", "a", "b")):
        directory = root / name
        if not (directory / "model.safetensors").is_file():
            torch.manual_seed(seed)
            LlamaForCausalLM(LlamaConfig(**BENCH_CONFIG)).save_pretrained(directory, max_shard_size="10GB")
            tokenizer.save_pretrained(directory)
        models[name] = directory
    return models


def measure(command: list[str], log: Path) -> dict:
    """Wall seconds and peak RSS of one process running `command`."""
    with open(log, "wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({process.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def speed_study(workdir: Path, repeats: int) -> dict:
    models = build_models(workdir / "models")
    names = {key: str(path) for key, path in models.items()}
    results = {}
    for method, template in SPEED_METHODS.items():
        flags = [arg.format(**names) for arg in template]
        orion_out, mergekit_out = workdir / f"orion-{method}", workdir / f"mergekit-{method}"
        orion_cmd = [str(BIN / "orion"), "merge", *flags, "--output", str(orion_out), "--force"]
        # a first run writes the YAML mergekit-yaml gets, and warms the page cache for both
        measure(orion_cmd, workdir / "orion.log")
        (workdir / f"{method}.yml").write_text((orion_out / "mergekit_config.yml").read_text())
        mergekit_cmd = [str(BIN / "mergekit-yaml"), str(workdir / f"{method}.yml"), str(mergekit_out)]
        if method == "dare":
            mergekit_cmd += ["--random-seed", "1"]
        runs: dict[str, list[dict]] = {"orion": [], "mergekit": []}
        for _ in range(repeats):
            for tool, command, out in (("mergekit", mergekit_cmd, mergekit_out), ("orion", orion_cmd, orion_out)):
                shutil.rmtree(out, ignore_errors=True)  # no run pays for deleting an earlier output
                runs[tool].append(measure(command, workdir / f"{tool}.log"))
        same = (orion_out / "model.safetensors").read_bytes() == (mergekit_out / "model.safetensors").read_bytes()
        row = {tool: {key: statistics.median(r[key] for r in rs) for key in ("seconds", "cpu_seconds", "peak_rss_mb")}
               for tool, rs in runs.items()}
        row["time_ratio"] = row["orion"]["seconds"] / row["mergekit"]["seconds"]
        row["cpu_ratio"] = row["orion"]["cpu_seconds"] / row["mergekit"]["cpu_seconds"]
        row["rss_ratio"] = row["orion"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"]
        row["bitwise_equal"] = same
        row["runs"] = runs
        results[method] = row
        print(f"{method:7s} " + " | ".join(
            f"{tool} {row[tool]['seconds']:6.2f} s wall {row[tool]['cpu_seconds']:6.2f} s cpu {row[tool]['peak_rss_mb']:6.0f} MB"
            for tool in ("orion", "mergekit")
        ) + f" | orion/mergekit: wall x{row['time_ratio']:.3f} cpu x{row['cpu_ratio']:.3f} rss x{row['rss_ratio']:.3f}"
            f" | same weights: {same}", flush=True)
    model_mb = (models["a"] / "model.safetensors").stat().st_size / 1e6
    return {"model_mb": round(model_mb, 1), "repeats": repeats, "methods": results}


# -- quality ---------------------------------------------------------------------


def corpus_halves() -> dict[str, dict[str, list[Path]]]:
    """The stdlib's top-level packages and modules, alphabetically, cut at half the bytes."""
    from orion_cli.reference.corpus import corpus_files, split_of, stdlib_root

    root = stdlib_root()
    by_top: dict[str, list[Path]] = {}
    for path in corpus_files():
        top = path.relative_to(root).parts[0].removesuffix(".py")
        by_top.setdefault(top, []).append(path)
    total = sum(p.stat().st_size for files in by_top.values() for p in files)
    halves: dict[str, dict[str, list[Path]]] = {"A": {"train": [], "heldout": []}, "B": {"train": [], "heldout": []}}
    seen = 0
    for top in sorted(by_top):
        half = "A" if seen < total / 2 else "B"
        for path in by_top[top]:
            halves[half][split_of(path)].append(path)
            seen += path.stat().st_size
    return halves


def describe_halves(halves) -> dict:
    from orion_cli.reference.corpus import stdlib_root

    root = stdlib_root()
    out = {}
    for half, splits in halves.items():
        tops = sorted({p.relative_to(root).parts[0].removesuffix(".py") for p in splits["train"] + splits["heldout"]})
        out[half] = {"first": tops[0], "last": tops[-1], "packages": len(tops),
                     "train_files": len(splits["train"]), "heldout_files": len(splits["heldout"])}
    return out


def token_ids(tokenizer, files: list[Path], limit: int | None = None, max_bytes: int | None = None):
    """Token ids of the files; with max_bytes, of a sample of whole files spread over all their packages."""
    import hashlib

    import torch

    if max_bytes is not None:
        spread = sorted(files, key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())
        files, total = [], 0
        for path in spread:
            if total >= max_bytes:
                break
            files.append(path)
            total += path.stat().st_size
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return ids[:limit] if limit else ids


def fine_tune(base: Path, ids, output: Path, steps: int, seed: int, learning_rate: float) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    # A fresh Adam state takes full-size steps at once: without a warmup even 1e-3 pushed
    # both variants above the base's perplexity on their own half.
    warmup = max(1, steps // 8)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))))
    seq_len, batch_size = 128, 8
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(output, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(output)
    return time.perf_counter() - started


def quality_study(workdir: Path, train_steps: int, eval_tokens: int, learning_rate: float) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orion_cli.config import load_config
    from orion_cli.merge import merge_models
    from orion_cli.reference import ensure_reference_model, evaluate_perplexity

    reference = ensure_reference_model(load_config().cache_path)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    halves = corpus_halves()
    heldout = {half: token_ids(tokenizer, splits["heldout"], eval_tokens) for half, splits in halves.items()}
    parents = {}
    train_seconds = {}
    for seed, half in enumerate(("A", "B")):
        # reused by a later run with the same --workdir and recipe
        parents[half] = workdir / f"fine-tuned-{half}-{train_steps}-steps-lr{learning_rate:g}"
        if not (parents[half] / "model.safetensors").is_file():
            ids = token_ids(tokenizer, halves[half]["train"], max_bytes=TRAIN_BYTES)
            train_seconds[half] = round(fine_tune(reference, ids, parents[half], train_steps, seed, learning_rate), 1)
            print(f"fine-tuned on half {half}: {train_seconds[half]} s", flush=True)
    a, b = str(parents["A"]), str(parents["B"])
    merges = {
        "linear 0.5/0.5": dict(models=[a, b], method="linear"),
        "slerp t=0.5": dict(models=[a, b], method="slerp"),
        "ties 0.5/0.5, density 0.5": dict(models=[a, b], method="ties", base=str(reference), ratios=[0.5, 0.5]),
        "dare 0.5/0.5, density 0.5": dict(models=[a, b], method="dare", base=str(reference), ratios=[0.5, 0.5]),
        "dare_linear 0.5/0.5, density 0.5": dict(models=[a, b], method="dare_linear", base=str(reference), ratios=[0.5, 0.5]),
        "dare_linear 1/1, density 0.5": dict(models=[a, b], method="dare_linear", base=str(reference), ratios=[1, 1]),
    }
    evaluated = {"base (reference model)": reference, "parent A (fine-tuned on A)": parents["A"],
                 "parent B (fine-tuned on B)": parents["B"]}
    for label, arguments in merges.items():
        output = workdir / ("merged-" + label.split()[0] + ("-sum" if "1/1" in label else ""))
        merge_models(output=output, force=True, seed=0, density=0.5, **arguments)
        evaluated[label] = output
    rows = {}
    for label, directory in evaluated.items():
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        rows[label] = {half: round(evaluate_perplexity(model, ids, 128), 3) for half, ids in heldout.items()}
        rows[label]["mean"] = round((rows[label]["A"] + rows[label]["B"]) / 2, 3)
        print(f"{label:34s} held-out A {rows[label]['A']:7.2f}   B {rows[label]['B']:7.2f}", flush=True)
    return {"halves": describe_halves(halves), "train_steps": train_steps, "learning_rate": learning_rate,
            "train_seconds": train_seconds,
            "eval_tokens_per_half": {half: int(len(ids)) for half, ids in heldout.items()}, "perplexity": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and outputs here (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool and method (medians reported)")
    parser.add_argument("--train-steps", type=int, default=200, help="fine-tuning steps per variant (batch 8 x 128 tokens)")
    parser.add_argument("--learning-rate", type=float, default=3e-4,
                        help="peak fine-tuning learning rate (linear warmup over 1/8 of the steps, then linear decay)")
    parser.add_argument("--eval-tokens", type=int, default=30000, help="held-out tokens per half")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-merge-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        results: dict = {"cpus": os.cpu_count()}
        if not args.skip_speed:
            results["speed"] = speed_study(workdir / "speed", args.repeats)
        if not args.skip_quality:
            results["quality"] = quality_study(workdir / "quality", args.train_steps, args.eval_tokens, args.learning_rate)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
