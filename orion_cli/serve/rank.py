"""The process of one rank of `orion serve`, started by torchrun: `python -m orion_cli.serve.rank`.

It joins the process group, finds its place, loads its stage of the model;
rank 0 then serves HTTP (driver.py) while every other rank follows the plans
rank 0 broadcasts (worker.py). Failures end the process with a one-line reason
on stderr, which torchrun's agent reports.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from ..heap import return_large_blocks_to_the_system
from .driver import run_driver
from .options import NODE_RANK_ENV, WorkerSpec
from .worker import (PROCESS_GROUP_TIMEOUT, RankRuntime, Topology, build_topology, follow, leave_process_group,
                     start_driver)

log = logging.getLogger("orion_cli.serve")


def _exit_with_parent() -> None:
    """torchrun's agent is our parent: if it dies (SIGKILL), do not outlive it."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="orion-parent-watch", daemon=True).start()


def _follower_signals(grace: float) -> None:
    """torchrun signals every rank at once; followers keep serving rank 0's drain, within a deadline."""

    def on_signal(signum, frame) -> None:
        timer = threading.Timer(grace, lambda: os._exit(1))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _setup_logging(verbose: bool, rank: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.WARNING,
                        format=f"orion serve [rank {rank}] %(levelname)s %(message)s")
    logging.getLogger("orion_cli").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("transformers", "torch", "uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main() -> int:
    spec = WorkerSpec.from_env()
    _setup_logging(spec.verbose, os.environ.get("RANK", "?"))
    # loading frees a temporary copy of every tensor; from the heap, glibc would keep most of them (heap.py):
    # TinyLlama in bfloat16 held 3.7 GiB after its load against 2.6 GiB with this, for 2.1 GiB of weights
    return_large_blocks_to_the_system()
    sys.stdout = sys.stderr  # stdout belongs to `orion serve --json`
    _exit_with_parent()
    node_rank = int(os.environ.get(NODE_RANK_ENV, "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    try:
        dist.init_process_group(spec.backend, timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=device if spec.backend == "nccl" else None)
        topology = build_topology(spec, node_rank, local_rank)
        if topology.is_driver:
            runner = start_driver(spec, topology, device)
        else:
            _follower_signals(spec.serve.drain_timeout + 10)
            runtime = RankRuntime(spec, topology, device)
    except Exception as exc:  # noqa: BLE001 - a one-line reason, then a failed exit torchrun reports
        _report_failure("startup", exc, spec.verbose)
        return 1
    if topology.is_driver:
        return run_driver(spec, runner)
    try:
        if topology.node_rank != 0 and local_rank == 0:
            _announce_join(spec, topology)
        follow(runtime)
    except Exception as exc:  # noqa: BLE001
        _report_failure("step", exc, spec.verbose)
        os._exit(1)  # peers may be gone; do not wait on process-group teardown
    leave_process_group(0)


def _announce_join(spec: WorkerSpec, topology: Topology) -> None:
    from .control import ControlClient

    control = ControlClient.connect()
    if control is not None:
        control.hello()
        control.send({"event": "joined", "node_rank": topology.node_rank, "stage": topology.stage,
                      "world_size": topology.world_size})


def _report_failure(when: str, exc: BaseException, verbose: bool) -> None:
    if verbose:
        log.exception("failed during %s", when)
    first = (str(exc).strip().splitlines() or [""])[0]
    sys.stderr.write(f"orion serve [rank {os.environ.get('RANK', '?')}]: {when} failed: {first}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
