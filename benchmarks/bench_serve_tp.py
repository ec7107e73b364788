"""Why orion serve's tensor parallelism is plain sharded modules: decode-step latency at tp=2, side by side.

Two gloo ranks on this machine load the same model two ways and time one decode step (batch 1, 100 cached
positions) through each:
  - transformers' own tensor parallelism, `from_pretrained(tp_plan="auto")` (DTensor under the hood)
  - orion serve's StageModel (gpt-fast-style column/row-parallel modules, orion_cli/serve/tp.py)
and the parameters each holds on rank 0.

    python benchmarks/bench_serve_tp.py --model /tmp/orion-bench-serve/llama-110m   # built by bench_serve.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed_ms(step, repeats: int) -> float:
    import torch.distributed as dist

    step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rank_main(rank: int, port: int, model_dir: str, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from orion_cli.checkpoint import CheckpointReader
    from orion_cli.serve.architectures import model_shape
    from orion_cli.serve.model import StageModel, make_batch
    from orion_cli.serve.tp import TPGroup, WeightLoader

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cached = 100
    result = {}
    with torch.inference_mode():
        hf = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
        past = hf(torch.zeros(1, cached, dtype=torch.long), use_cache=True).past_key_values

        def hf_step() -> None:
            hf(torch.zeros(1, 1, dtype=torch.long), past_key_values=past, use_cache=True)
            past.crop(cached)

        result["transformers_tp_plan_ms"] = timed_ms(hf_step, repeats)
        result["transformers_params_rank0"] = sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in hf.parameters())
        del hf, past
        config = AutoConfig.from_pretrained(model_dir)
        shape = model_shape(config)
        with CheckpointReader(model_dir) as reader:
            stage = StageModel(shape, config, range(shape.num_layers), True, True, TPGroup(rank, 2, dist.group.WORLD),
                               WeightLoader(reader, torch.float32, torch.device("cpu")), 1, cached + 8)

        def orion_step() -> None:
            batch = stage.prepare(make_batch(False, 0, [1], [cached], shape.sliding_window, stage.device),
                                  torch.float32)
            stage.logits(stage(stage.embed_tokens(torch.zeros(1, 1, dtype=torch.long), batch), batch), batch)

        result["orion_plain_modules_ms"] = timed_ms(orion_step, repeats)
        result["orion_params_rank0"] = sum(p.numel() for p in stage.parameters())
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "orion-bench-serve" / "llama-110m")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"--model {args.model}: no config.json; run benchmarks/bench_serve.py first, which builds it")
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(rank_main, args=(port, str(args.model), args.repeats, out), nprocs=2, join=True)
        result = json.loads(Path(out).read_text())
    print(json.dumps(result, indent=2))
    print(f"decode step at tp=2: transformers tp_plan {result['transformers_tp_plan_ms']:.1f} ms, "
          f"orion {result['orion_plain_modules_ms']:.1f} ms "
          f"({result['transformers_tp_plan_ms'] / result['orion_plain_modules_ms']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
