"""What the weight-file check costs before every command, against reading the weights once.

Writes a 1 GB safetensors checkpoint (a Llama's tensor layout, random values),
then times, interleaved, with the page cache dropped for the file before each
run (posix_fadvise DONTNEED) and warm:

- orion's check (ModelDir.check_weights: headers and sizes only),
- `cp` of the file to /dev/null's neighbour (what reading the weights once costs),
- sha256 of the file (what `orion register` does anyway).

    python benchmarks/bench_checks.py [--size-gb 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def write_checkpoint(directory: Path, size_bytes: int) -> Path:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    hidden, inter = 2048, 5632
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, -(-size_bytes // (4 * per_layer)))
    tensors = {"model.embed_tokens.weight": torch.randn(8000, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden)
        tensors[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    return directory


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, path: Path, cold: bool) -> float:
    if cold:
        drop_cache(path)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from orion_cli.modeldir import inspect_model_dir, sha256_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orion-bench-checks-") as scratch:
        model = write_checkpoint(Path(scratch) / "model", int(args.size_gb * 1e9))
        weights = model / "model.safetensors"
        copy = Path(scratch) / "copy.safetensors"
        size = weights.stat().st_size
        runs = {
            "orion check": lambda: inspect_model_dir(model).check_weights(),
            "cp": lambda: subprocess.run(["cp", str(weights), str(copy)], check=True),
            "sha256": lambda: sha256_file(weights),
        }
        print(f"checkpoint: {size / 1e9:.2f} GB, {len(inspect_model_dir(model).weight_files)} file; "
              f"load average {os.getloadavg()[0]:.2f}")
        for cold in (True, False):
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):  # interleaved, so load changes hit every system alike
                for name, fn in runs.items():
                    times[name].append(timed(fn, weights, cold))
            label = "cold (page cache dropped)" if cold else "warm"
            check = statistics.median(times["orion check"])
            print(f"\n{label}: median of {args.repeats}")
            for name, values in times.items():
                median = statistics.median(values)
                print(f"  {name:12s} {median * 1e3:9.2f} ms   check / this = {check / median:.5f}")
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
