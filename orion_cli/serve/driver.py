"""Rank 0's process: the scheduler, the HTTP server, and how they stop.

SIGTERM (torchrun forwards it from `orion serve`) drains: new requests and
/health get 503 at once while the listening socket stays open, in-flight
requests finish within --drain-timeout, then the HTTP server and every rank
stop. A second Ctrl-C stops at once. A failed step ends the
engine instead: in-flight requests get 503 and the process exits non-zero,
so torchrun restarts the group (--max-restarts) or `orion serve` exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import uvicorn

from .api import ServedModel, create_app
from .metrics import ServeMetrics
from .protocol import StepPlan
from .scheduler import Scheduler, StepRunner

log = logging.getLogger("orion_cli.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn, answering 503 from the first stop signal until in-flight requests are done, then stopping.

    uvicorn's own shutdown closes the listening socket first, so new clients
    would get connection resets; this keeps it open while the scheduler drains.
    """

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_timeout: float):
        super().__init__(config)
        self.scheduler = scheduler
        self.drain_timeout = drain_timeout
        self.stopped_by: str | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.stopped_by is not None:
            # torchrun's agent may deliver SIGTERM more than once; a second Ctrl-C stops at once
            if sig == signal.SIGINT:
                self.should_exit = self.force_exit = True
            return
        self.stopped_by = signal.Signals(sig).name
        self.scheduler.drain()
        threading.Thread(target=self._exit_when_drained, name="orion-drain", daemon=True).start()

    def _exit_when_drained(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        # in flight: sequences the engine still runs, and HTTP responses still being sent (a stream may
        # outlast its generation: the engine finishes first, the client reads later)
        while (self.scheduler.in_flight or self.server_state.tasks) and self.scheduler.failure is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def eos_token_ids(model_dir: str | Path, tokenizer: Any) -> set[int]:
    """The ids that end generation, as transformers' generate() reads them."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return set(value) if isinstance(value, list) else {value}
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


def serve_http(runner: StepRunner, served: ServedModel, sock: socket.socket, *, eos: set[int],
               max_batch_size: int, api_key: str | None, drain_timeout: float, max_request_bytes: int, verbose: bool,
               announce: Callable[[dict[str, Any]], None], describe: dict[str, Any],
               recompute_at: int | None = None) -> dict[str, Any]:
    """Serve until stopped; returns what happened, with the process exit code under "code"."""
    metrics = ServeMetrics(served.id)
    failed = threading.Event()

    def on_failure(reason: str) -> None:
        failed.set()
        server.should_exit = True

    scheduler = Scheduler(runner, served.tokenizer, eos, max_batch_size, served.max_model_len, metrics, on_failure,
                          recompute_at, served.vocab_size)
    app = create_app(scheduler, served, metrics, api_key, max_request_bytes)
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=int(max(1, drain_timeout)), lifespan="off")
    server = DrainingServer(config, scheduler, drain_timeout)
    metrics.update_ranks(runner.run(StepPlan("stats")) or [])  # weights per rank, for the ready line and /metrics
    scheduler.start()
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    announce({"event": "ready", "url": url, "model": served.id, "pid": os.getpid(), **describe,
              "max_model_len": served.max_model_len,
              "ranks": [{k: r[k] for k in ("rank", "node", "stage", "tp_rank", "pid", "weight_bytes",
                                           "resident_bytes") if k in r} for r in metrics.ranks]})
    # uvicorn re-raises the signal it drained for once it returns; a no-op handler lets us finish the shutdown.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
        drained = False if failed.is_set() else scheduler.stop(drain_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = {"url": url, "requests": scheduler.served, "generated_tokens": scheduler.generated_tokens,
              "drained": drained, "failure": scheduler.failure, "stopped_by": server.stopped_by,
              "code": 0 if drained else 1}
    announce({"event": "summary", **{k: v for k, v in result.items() if k != "url"}})
    return result


def run_driver(spec, runner) -> NoReturn:
    """Rank 0 of the torch.distributed engine, running its plans through `runner` (worker.start_driver)."""
    from transformers import AutoTokenizer

    from .control import ControlClient, bind_listening_socket
    from .worker import leave_process_group

    settings = spec.serve
    control = ControlClient.connect()
    sock = control.receive_listening_socket() if control is not None else None
    if sock is None:  # started by torchrun directly, not by `orion serve`
        sock = bind_listening_socket(settings.host, spec.port)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    served = ServedModel(
        id=spec.model_id, root=spec.model_dir, max_model_len=spec.max_model_len, tokenizer=tokenizer,
        vocab_size=runner.runtime.shape.vocab_size,
        metadata={"orion": {"engine": "torch", "architecture": spec.architecture, "tp": settings.tp,
                            "pp": settings.pp, "layers_per_stage": spec.layer_counts, "backend": spec.backend,
                            "dtype": settings.dtype, "activation_codec": settings.activation_codec,
                            **({"quantization": spec.quantization} if spec.quantization else {}),
                            **({"registry": spec.registry_entry} if spec.registry_entry else {})}},
    )
    announce = control.send if control is not None else (lambda message: log.info("%s", message))
    code = serve_http(
        runner, served, sock, eos=eos_token_ids(spec.model_dir, tokenizer),
        max_batch_size=settings.max_batch_size, api_key=settings.api_key, drain_timeout=settings.drain_timeout,
        max_request_bytes=settings.max_request_bytes, verbose=spec.verbose, announce=announce,
        describe={"engine": "torch", "tp": settings.tp, "pp": settings.pp, "backend": spec.backend},
        recompute_at=runner.runtime.recompute_at,
    )["code"]
    if code:
        os._exit(code)  # peers may be gone: do not wait on the process group's teardown
    leave_process_group(0)
