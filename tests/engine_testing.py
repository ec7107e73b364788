"""The serving engine without HTTP, in real gloo processes: for parity tests at the model layer.

run_layout() starts tp x pp processes (torch.multiprocessing), each of which
builds, for every model given, the worker spec exactly as `orion serve` does
(check_torch_options), its topology and its stage of the model (RankRuntime).
Rank 0 runs the real Scheduler over the DistributedRunner; the other ranks
follow its plans. For each model, rank 0 first decodes all requests together
(one batched prefill, batched decode steps; each request stops at its own
max_tokens, so slots free and move), then the first one alone, and writes the
token ids it got.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

CASES = ("batched", "alone")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_layout(tp: int, pp: int, models: dict[str, str], prompts: list[list[int]], new_tokens: int | list[int],
               out_dir: Path, max_model_len: int = 256) -> dict[str, dict[str, list[list[int]]]]:
    """{model: {"batched": [ids per prompt], "alone": [ids of the first prompt]}} at this layout.

    `new_tokens` is one count for every prompt, or one per prompt.
    """
    import torch.multiprocessing as mp

    counts = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    out = Path(out_dir) / f"tp{tp}-pp{pp}.json"
    mp.spawn(_rank, args=(free_port(), tp, pp, models, prompts, counts, max_model_len, str(out)), nprocs=tp * pp,
             join=True)
    return json.loads(out.read_text())


def _rank(rank: int, port: int, tp: int, pp: int, models: dict[str, str], prompts: list[list[int]],
          new_tokens: list[int], max_model_len: int, out: str) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    from orion_cli.config import shipped_config
    from orion_cli.modeldir import inspect_model_dir
    from orion_cli.serve.options import ServeJob, check_torch_options
    from orion_cli.serve.worker import RankRuntime, build_topology, follow, leave_process_group, start_driver

    faulthandler.enable(all_threads=True)  # a native abort prints every thread's Python stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=tp * pp)
    shipped = shipped_config()
    settings = shipped.serve.model_copy(update={"tp": tp, "pp": pp, "max_batch_size": len(prompts),
                                                "max_model_len": max_model_len, "backend": "gloo"})
    results = {}
    for name, path in models.items():
        job = ServeJob(path, "models.json", settings, shipped.codec)
        spec = check_torch_options(job, inspect_model_dir(path), name, None)
        topology = build_topology(spec, 0, rank)
        if topology.is_driver:
            runner = start_driver(spec, topology, torch.device("cpu"))
            results[name] = drive(runner, runner.runtime, path, prompts, new_tokens)
        else:
            follow(RankRuntime(spec, topology, torch.device("cpu")))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    leave_process_group(0)  # as `orion serve`'s ranks end


def drive(runner, runtime, model_dir: str, prompts: list[list[int]], new_tokens: list[int]) -> dict:
    from transformers import AutoTokenizer

    from orion_cli.serve.metrics import ServeMetrics
    from orion_cli.serve.scheduler import GenerationRequest, Scheduler

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scheduler = Scheduler(runner, tokenizer, set(), len(prompts), runtime.spec.max_model_len, ServeMetrics(),
                          recompute_at=runtime.recompute_at)

    def submit(prompt: list[int], count: int) -> tuple[list[int], threading.Event]:
        tokens: list[int] = []
        done = threading.Event()

        def deliver(event) -> None:
            assert event.error is None and event.failure is None, event.error or event.failure
            tokens.extend(event.token_ids)
            if event.finish_reason:
                done.set()

        scheduler.submit(GenerationRequest(list(prompt), count, ignore_eos=True), deliver)
        return tokens, done

    batched = [submit(p, n) for p, n in zip(prompts, new_tokens)]  # all waiting: one batched prefill
    scheduler.start()
    for _, done in batched:
        assert done.wait(300), "a batched request did not finish"
    alone, done = submit(prompts[0], new_tokens[0])
    assert done.wait(300), "the single request did not finish"
    assert scheduler.stop(60), scheduler.failure
    return {"batched": [tokens for tokens, _ in batched], "alone": [alone]}
