"""orion shard against its peers, side by side, on a checkpoint of at least 1 GB built here.

Throughput, against three peers working on the same bytes:
  cp                the plain copy (the issue's target: orion shard at least 0.8x of it);
  cp_then_sha256    cp, then sha256 (`openssl dgst`) of the source and of the copy: the
                    least work that yields what orion records (a sha256 of every shard
                    for the manifest, and of the source for provenance);
  sha256_of_source  the source's sha256 alone, a floor no tool that records it goes below.
CPU seconds (user + system) are reported beside wall time, because on a shared
machine wall time also measures the neighbours.
Peak memory: `orion shard` against transformers' `save_pretrained(max_shard_size=...)`
re-sharding the same model.

Every measured command runs in its own process, started through a fresh
wrapper process, so its peak RSS (getrusage RUSAGE_CHILDREN) is its own.
`sync` runs before each measurement so no run pays for an earlier run's
write-back. Two cache states are measured, each run --runs times, medians reported:

  warm: the source is in the page cache (it was just written or read), which
        is how a user who has just produced or downloaded a model shards it;
  cold: the source's pages are evicted first (posix_fadvise DONTNEED on its
        files only), so both tools read it from disk.

Outputs land in the page cache in both states (neither tool fsyncs).

    python benchmarks/bench_shard.py                 # builds, measures, deletes
    python benchmarks/bench_shard.py --json --runs 3
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

# ~270M parameters: 1.08 GB in fp32.
CHECKPOINT_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                         tie_word_embeddings=False)


def build_checkpoint(directory: Path) -> None:
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(**{CHECKPOINT_CONFIG!r})
LlamaForCausalLM(config).save_pretrained({str(directory)!r}, max_shard_size="10GB")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def measure(command: list[str]) -> dict:
    """Wall time and peak RSS of `command`, run as the only child of a fresh wrapper process."""
    os.sync()
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "start = time.perf_counter()\n"
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "wall = time.perf_counter() - start\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'code': code, 'seconds': wall, 'cpu_seconds': usage.ru_utime + usage.ru_stime,\n"
        "                  'peak_rss_mb': usage.ru_maxrss / 1024}))\n"
    )
    output = subprocess.run([sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True)
    result = json.loads(output.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {result['code']}")
    return result


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (only theirs; nothing else is touched)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(16 * 2**20):
                pass


def run(workdir: Path, runs: int, shards: int, hf_shard_size: str, source: Path | None = None) -> dict:
    build_started = time.perf_counter()
    if source is None:
        source = workdir / "source"
        build_checkpoint(source)
    weights = sorted(source.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in weights)
    if total < 1e9:
        raise SystemExit(f"checkpoint is only {total / 1e9:.2f} GB; the benchmark needs at least 1 GB")
    report: dict = {
        "checkpoint": {"bytes": total, "files": [p.name for p in weights], "config": CHECKPOINT_CONFIG,
                       "build_seconds": round(time.perf_counter() - build_started, 1)},
        "cpus": len(os.sched_getaffinity(0)),
    }

    def cp_command(out: Path) -> list[str]:
        return ["cp", *map(str, weights), str(out)]

    def orion_command(out: Path) -> list[str]:
        return [sys.executable, "-m", "orion_cli", "shard", "--model", str(source), "--output", str(out),
                "--shards", str(shards), "--force"]

    def cp_and_hash_command(out: Path) -> list[str]:
        # The least a manifest with sha256 and a provenance digest costs: copy, hash the source, hash the copy.
        # openssl's sha256 uses the CPU's SHA extensions, as Python's hashlib does (coreutils' sha256sum may not).
        script = 'cp "$@" "$OUT" && openssl dgst -sha256 "$@" "$OUT"/* > /dev/null'
        return ["env", f"OUT={out}", "sh", "-c", script, "sh", *map(str, weights)]

    def hash_source_command(out: Path) -> list[str]:
        # The provenance digest alone: one sha256 pass over the source, which no sharding can skip.
        return ["openssl", "dgst", "-sha256", *map(str, weights)]

    peers = (("cp", cp_command), ("orion_shard", orion_command), ("cp_then_sha256", cp_and_hash_command),
             ("sha256_of_source", hash_source_command))
    for state in ("warm", "cold"):
        samples: dict[str, list[dict]] = {name: [] for name, _ in peers}
        load = []
        for _ in range(runs):
            for name, command in peers:
                out = workdir / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                if name in ("cp", "cp_then_sha256"):
                    out.mkdir()
                (evict if state == "cold" else warm)(weights)
                load.append(os.getloadavg()[0])
                samples[name].append(measure(command(out)))
                shutil.rmtree(out, ignore_errors=True)

        def median(name: str, key: str) -> float:
            return statistics.median(s[key] for s in samples[name])

        report[state] = {
            **{f"{name}_seconds": [round(s["seconds"], 3) for s in samples[name]] for name, _ in peers},
            **{f"{name}_gb_per_s": round(total / median(name, "seconds") / 1e9, 3) for name, _ in peers},
            **{f"{name}_cpu_seconds": round(median(name, "cpu_seconds"), 3) for name, _ in peers},
            "throughput_ratio_vs_cp": round(median("cp", "seconds") / median("orion_shard", "seconds"), 3),
            "throughput_ratio_vs_cp_then_sha256": round(
                median("cp_then_sha256", "seconds") / median("orion_shard", "seconds"), 3),
            "orion_shard_peak_rss_mb": round(max(s["peak_rss_mb"] for s in samples["orion_shard"]), 1),
            "load_average_1min": [round(x, 2) for x in load],
        }

    # The startup cost every orion command pays, for reading the ratio above.
    report["orion_startup"] = measure([sys.executable, "-m", "orion_cli", "--version"])

    hf_out = workdir / "out-transformers"
    resave = (
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        "AutoModelForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], max_shard_size=sys.argv[3])\n"
    )
    warm(weights)
    hf = measure([sys.executable, "-c", resave, str(source), str(hf_out), hf_shard_size])
    shutil.rmtree(hf_out, ignore_errors=True)
    orion_rss = report["warm"]["orion_shard_peak_rss_mb"]
    report["memory"] = {
        "orion_shard_peak_rss_mb": orion_rss,
        "transformers_save_pretrained_peak_rss_mb": round(hf["peak_rss_mb"], 1),
        "transformers_save_pretrained_seconds": round(hf["seconds"], 3),
        "rss_ratio_orion_over_transformers": round(orion_rss / hf["peak_rss_mb"], 3),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="Parent of the temporary directory holding the checkpoint and outputs (deleted after).")
    parser.add_argument("--runs", type=int, default=2, help="Runs per tool and cache state (default 2).")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--hf-shard-size", default="300MB", help="max_shard_size for save_pretrained (default 300MB).")
    parser.add_argument("--source", type=Path, help="Use this checkpoint instead of building one (it is kept).")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    workdir = Path(tempfile.mkdtemp(prefix="orion-bench-shard-", dir=args.workdir))
    try:
        report = run(workdir, args.runs, args.shards, args.hf_shard_size, args.source)
    finally:  # the built checkpoint and every output live here; a --source checkpoint is elsewhere and kept
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    size = report["checkpoint"]["bytes"] / 1e9
    print(f"checkpoint: {size:.2f} GB ({', '.join(report['checkpoint']['files'])}), {report['cpus']} CPUs")
    for state in ("warm", "cold"):
        r = report[state]
        print(f"{state}: (load average {r['load_average_1min']})")
        for name in ("cp", "orion_shard", "cp_then_sha256", "sha256_of_source"):
            print(f"  {name:<18} {r[name + '_gb_per_s']:5.2f} GB/s  wall {r[name + '_seconds']} s  "
                  f"cpu {r[name + '_cpu_seconds']:.2f} s (median)")
        print(f"  orion shard / cp: {r['throughput_ratio_vs_cp']:.2f}x   "
              f"orion shard / (cp + sha256 of both): {r['throughput_ratio_vs_cp_then_sha256']:.2f}x")
    print(f"orion startup (orion --version): {report['orion_startup']['seconds']:.2f} s")
    m = report["memory"]
    print(f"peak RSS: orion shard {m['orion_shard_peak_rss_mb']:.0f} MB vs transformers save_pretrained "
          f"{m['transformers_save_pretrained_peak_rss_mb']:.0f} MB ({m['rss_ratio_orion_over_transformers']:.2f}x); "
          f"save_pretrained took {m['transformers_save_pretrained_seconds']:.1f} s")


if __name__ == "__main__":
    main()
