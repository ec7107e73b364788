"""`orion serve` as a library call: check everything, then run torchrun's agent in this process.

The agent is torch.distributed.launcher's elastic_launch (what torchrun runs)
with c10d rendezvous: one node by default, or --nnodes nodes meeting at
--master-addr:--master-port. It starts tp x pp / nnodes workers here
(`python -m orion_cli.serve.rank`), restarts the group up to --max-restarts
times after a failure, and forwards SIGTERM/SIGINT to them. Rank 0 serves HTTP
on the socket this process binds before any worker starts.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from ..config import CodecSettings, ServeSettings, override, shipped_config
from ..progress import NULL_PROGRESS, ProgressReporter
from .options import (NODE_RANK_ENV, SPEC_ENV, ServeError, ServeJob, ServeSummary, check_common, check_torch_options,
                      choose_engine, resolve_model)

log = logging.getLogger("orion_cli.serve")

EventHandler = Callable[[dict[str, Any]], None]


def serve(model: str | Path, settings: ServeSettings | None = None, *, codec: CodecSettings | None = None,
          registry: str | Path | None = None, cache_dir: str | Path | None = None, verbose: bool = False,
          progress: ProgressReporter = NULL_PROGRESS, on_event: EventHandler = lambda event: None,
          **overrides: Any) -> ServeSummary:
    """Serve `model` (a directory or registry key) until stopped; events ('ready', 'joined', ...) go to `on_event`.

    `settings` and `codec` default to configs/default.yaml's serve and codec
    sections; any serve setting may be given as a keyword override (tp=2, port=0).
    `cache_dir` (default: the config's) keeps the fp32 ONNX export that
    engine="onnxruntime" serves for a checkpoint (onnx_cache.py).
    """
    defaults = shipped_config()
    job = ServeJob(str(model), registry or defaults.registry, override(settings or defaults.serve, **overrides),
                   codec or defaults.codec, verbose, Path(cache_dir) if cache_dir else defaults.cache_path)
    check_common(job.settings)
    model_dir, model_id, entry = resolve_model(job)
    if choose_engine(job.settings, model_dir) == "onnxruntime":
        from .onnx_serving import check_onnx_options, serve_onnx

        if model_dir.format == "onnx":
            return serve_onnx(job, model_dir, model_id, entry, on_event)
        from .onnx_cache import float_model_for

        check_onnx_options(job.settings, model_dir)
        exported = float_model_for(model_dir, job.cache_dir, progress)
        return serve_onnx(job, exported, model_id, entry, on_event, source=model_dir)
    spec = check_torch_options(job, model_dir, model_id, entry)
    for note in spec.notes:
        log.warning("%s", note)
    settings = job.settings
    listening = None
    if settings.node_rank == 0:
        from .control import bind_listening_socket

        try:
            listening = bind_listening_socket(settings.host, settings.port)
        except OSError as exc:
            raise ServeError(f"--host {settings.host} --port {settings.port}: cannot listen there "
                             f"({exc.strerror})") from None
        spec.port = listening.getsockname()[1]
    summary = ServeSummary(model_id, "torch", f"http://{settings.host}:{spec.port}" if listening else None,
                           settings.nnodes, settings.node_rank, settings.tp, settings.pp)
    try:
        _launch(job, spec, listening, summary, on_event)
    finally:
        if listening is not None:
            listening.close()
    return summary


def _launch(job: ServeJob, spec, listening, summary: ServeSummary, on_event: EventHandler) -> None:
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

    options = job.settings
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
    _quiet_torchelastic(job.verbose)
    saved = {key: os.environ.get(key) for key in worker_env}
    os.environ.update(worker_env)  # the agent passes its environment on to the workers
    try:
        elastic_launch(config, sys.executable)("-m", "orion_cli.serve.rank")
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
