"""`orion serve` as a library call: check everything, then run torchrun's agent in this process.

The agent is torch.distributed.launcher's elastic_launch (what torchrun runs)
with c10d rendezvous: one node by default, or --nnodes nodes meeting at
--master-addr:--master-port. It starts tp x pp / nnodes workers here
(`python -m orion_cli.serve.worker`), restarts the group up to --max-restarts
times after a failure, and forwards SIGTERM/SIGINT to them. Rank 0 serves HTTP
on the socket this process binds before any worker starts.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..errors import OrionError
from .options import NODE_RANK_ENV, SPEC_ENV, ServeOptions, check_common, check_torch_options, resolve_model

log = logging.getLogger("orion_cli.serve")

EventHandler = Callable[[dict[str, Any]], None]


class ServeError(OrionError):
    """A worker failed, the rendezvous did not complete, or the port could not be bound."""


@dataclass
class ServeSummary:
    model: str
    engine: str
    url: str | None
    nnodes: int
    node_rank: int
    tp: int
    pp: int
    requests: int = 0
    generated_tokens: int = 0
    restarts: int = 0
    stopped_by: str | None = None
    drained: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"event": "stopped", **asdict(self)}


def serve(options: ServeOptions, on_event: EventHandler = lambda event: None) -> ServeSummary:
    """Serve `options.model` until stopped; events ('ready', 'joined', ...) go to `on_event`."""
    check_common(options)
    model, model_id, entry = resolve_model(options)
    if model.format == "onnx":
        from .onnx_engine import serve_onnx

        return serve_onnx(options, model, model_id, entry, on_event)
    spec = check_torch_options(options, model, model_id, entry)
    for note in spec.notes:
        log.warning("%s", note)
    listening = None
    if options.node_rank == 0:
        from .control import bind_listening_socket

        try:
            listening = bind_listening_socket(options.host, options.port)
        except OSError as exc:
            raise ServeError(f"--host {options.host} --port {options.port}: cannot listen there ({exc.strerror})") from None
        spec.port = listening.getsockname()[1]
    summary = ServeSummary(model_id, "torch", f"http://{options.host}:{spec.port}" if listening else None,
                           options.nnodes, options.node_rank, options.tp, options.pp)
    try:
        _launch(options, spec, listening, summary, on_event)
    finally:
        if listening is not None:
            listening.close()
    return summary


def _launch(options: ServeOptions, spec, listening, summary: ServeSummary, on_event: EventHandler) -> None:
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .control import ControlServer

    readies = {"count": 0}

    def on_message(message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            readies["count"] += 1
            summary.restarts = readies["count"] - 1
            on_event({**message, "restart": summary.restarts} if summary.restarts else message)
        elif event == "summary":
            summary.requests += message.get("requests", 0)
            summary.generated_tokens += message.get("generated_tokens", 0)
            summary.drained = message.get("drained")
        else:
            on_event(message)

    control = ControlServer(listening, on_message)
    nproc = spec.world_size // options.nnodes
    worker_env = {
        SPEC_ENV: spec.to_env(), NODE_RANK_ENV: str(options.node_rank), **control.env(),
        # A store shared across restarts hands the new group stale peer addresses (pytorch/pytorch#135712);
        # unshared, each round's rank 0 hosts a fresh one.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    if spec.backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one machine share its cores; oversubscribed BLAS threads slow every rank down
        worker_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    if options.nnodes == 1:
        endpoint, run_id = "127.0.0.1:0", uuid.uuid4().hex
    else:
        endpoint, run_id = f"{options.master_addr}:{options.master_port}", f"orion-serve-{options.master_port}"
    config = LaunchConfig(
        # torchelastic's per-rank log folders go in the control channel's own temporary folder, removed with it
        logs_specs=DefaultLogsSpecs(log_dir=str(control.scratch / "torchelastic")),
        min_nodes=options.nnodes, max_nodes=options.nnodes, nproc_per_node=nproc, run_id=run_id,
        rdzv_backend="c10d", rdzv_endpoint=endpoint, rdzv_configs={"is_host": options.node_rank == 0},
        max_restarts=options.max_restarts, monitor_interval=0.2, start_method="spawn",
        shutdown_timeout=int(options.drain_timeout) + 15,
        local_addr="127.0.0.1" if options.nnodes == 1 else None,
    )
    _quiet_torchelastic(options.verbose)
    saved = {key: os.environ.get(key) for key in worker_env}
    os.environ.update(worker_env)  # the agent passes its environment on to the workers
    try:
        elastic_launch(config, sys.executable)("-m", "orion_cli.serve.worker")
    except ChildFailedError as exc:
        raise ServeError(describe_failure(exc)) from None
    except SignalException as exc:
        summary.stopped_by = exc.sigval.name
    except RendezvousError as exc:
        raise ServeError(f"--master-addr {options.master_addr} --master-port {options.master_port}: "
                         f"the nodes did not meet ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    finally:
        control.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def describe_failure(exc) -> str:
    """One line naming the worker that failed first and how."""
    import signal

    rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
    if failure.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-failure.exitcode}"
    else:
        how = f"exited with code {failure.exitcode}"
    more = len(exc.failures) - 1
    others = f" ({more} more rank{'s' if more > 1 else ''} stopped with it)" if more else ""
    hint = "; its own message is above" if failure.exitcode > 0 else ""
    return f"worker rank {rank} (pid {failure.pid}) {how}{others}{hint}"


def _quiet_torchelastic(verbose: bool) -> None:
    """torchelastic logs every restart and signal at WARNING; orion reports those itself."""
    level = logging.INFO if verbose else logging.CRITICAL
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")
    for name in [n for n in logging.root.manager.loggerDict if n.startswith(prefixes)] + list(prefixes):
        logging.getLogger(name).setLevel(level)
