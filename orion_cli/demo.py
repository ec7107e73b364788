"""orion's main job on the built-in default model, end to end, with no arguments and no network.

The preparation is the shipped pipeline configs/demo.yaml (reference model ->
q4 with --test, fp32 -> 4 shards, both registered in WORKDIR/models.json), so a
second run skips what is already up to date. Then `orion serve` runs as a real
process on the sharded model with tensor parallelism, answers one chat
completion over HTTP on 127.0.0.1, and is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OrionError
from .progress import NULL_PROGRESS, ProgressReporter
from .resources import configs_dir

DEMO_PIPELINE = "demo.yaml"
SERVED_KEY = "reference-sharded"
QUANTIZED_KEY = "reference-q4"
# The reference model knows Python source, not conversation: ask it for code.
PROMPT = 'def reverse(text):\n    """Return text reversed."""\n'
MAX_TOKENS = 48
SERVER_START_TIMEOUT = 300.0
REQUEST_TIMEOUT = 120.0


class DemoError(OrionError):
    """The demo's server did not come up or did not answer."""


@dataclass
class DemoResult:
    workdir: Path
    registry: Path
    steps: list[dict[str, Any]]
    reference: dict[str, Any]
    quantized: dict[str, Any]
    sharded: dict[str, Any]
    served: dict[str, Any]
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir), "registry": str(self.registry), "outputs": self.outputs,
            "steps": self.steps, "reference": self.reference, "quantized": self.quantized,
            "sharded": self.sharded, "served": self.served, "seconds": round(self.seconds, 1),
        }


def run_demo(workdir: Path, cache_dir: Path, settings: Any, *, tp: int = 2, force: bool = False,
             progress: ProgressReporter = NULL_PROGRESS) -> DemoResult:
    """Prepare (or reuse) the demo's models in `workdir`, serve the sharded one, ask it one question."""
    from .modeldir import inspect_model_dir
    from .pipeline import RunContext, load_pipeline, run_pipeline
    from .registry import Registry

    started = time.perf_counter()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    registry_path = workdir / "models.json"
    pipeline = load_pipeline(configs_dir() / DEMO_PIPELINE, {"out": str(workdir)})
    ctx = RunContext(pipeline, registry_path, cache_dir, settings, force=force, progress=progress)
    reports = run_pipeline(ctx)
    outputs = {r.id: r.output for r in reports if r.output}

    reference_dir = ctx.reference_model()
    reference_meta = inspect_model_dir(reference_dir).metadata or {}
    quantized_meta = json.loads((Path(outputs["quantize"]) / "metadata.json").read_text())
    entries = Registry(registry_path).entries()
    with progress.stage(f"Serving {SERVED_KEY} with tp={tp} and asking one chat completion"):
        served = ask_one_question(registry_path, SERVED_KEY, tp, settings.serve.backend)

    quality = quantized_meta.get("quality") or {}
    return DemoResult(
        workdir=workdir,
        registry=registry_path,
        steps=[r.as_dict() for r in reports],
        reference={"path": str(reference_dir), "size_mb": _mb(inspect_model_dir(reference_dir).weight_bytes),
                   **reference_meta.get("reference", {})},
        quantized={"key": QUANTIZED_KEY, "path": outputs["quantize"], "size_mb": entries[QUANTIZED_KEY]["size_mb"],
                   "level": quantized_meta["quantization"]["level"], "bits": quantized_meta["quantization"]["bits"],
                   "reduction_percent": quantized_meta["sizes"]["reduction_percent"], "quality": quality},
        sharded={"key": SERVED_KEY, "path": outputs["shard"], "size_mb": entries[SERVED_KEY]["size_mb"],
                 "shards": len(entries[SERVED_KEY]["urls"]["shards"])},
        served=served,
        seconds=time.perf_counter() - started,
        outputs=outputs,
    )


def _mb(n: int) -> float:
    return round(n / 1e6, 3)


def ask_one_question(registry_path: Path, key: str, tp: int, backend: str) -> dict[str, Any]:
    """Start `orion serve` as its own process group, ask one chat completion, stop it with SIGTERM."""
    import httpx

    command = [sys.executable, "-m", "orion_cli", "serve", key, "--registry", str(registry_path), "--tp", str(tp),
               "--host", "127.0.0.1", "--port", "0", "--backend", backend, "--json"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    stderr_tail: list[str] = []
    events: list[dict[str, Any]] = []
    threading.Thread(target=_keep_tail, args=(server.stderr, stderr_tail), daemon=True).start()
    threading.Thread(target=_read_events, args=(server.stdout, events), daemon=True).start()
    try:
        ready = _wait_ready(server, events, stderr_tail)
        url = ready["url"]
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/chat/completions", timeout=REQUEST_TIMEOUT, json={
            "model": ready.get("model", key), "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS, "temperature": 0,
        })
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise DemoError(f"orion serve answered HTTP {response.status_code}: {response.text[:200]}")
        body = response.json()
        tokens = body["usage"]["completion_tokens"]
        answer = body["choices"][0]["message"]["content"]
        stopped_by = _stop(server)
        time.sleep(0.2)  # the reader takes the server's last line
        stopped = next((e for e in events if e.get("event") == "stopped"), {})
        return {"url": url, "tp": tp, "backend": ready.get("backend"), "prompt": PROMPT, "answer": answer,
                "completion_tokens": tokens, "seconds": round(seconds, 3),
                "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
                "stopped_by": stopped.get("stopped_by") or stopped_by, "drained": stopped.get("drained")}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _keep_tail(stream, tail: list[str]) -> None:
    for line in stream:
        tail.append(line.rstrip())
        del tail[:-20]


def _read_events(stream, events: list[dict[str, Any]]) -> None:
    for line in stream:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue


def _wait_ready(server: subprocess.Popen, events: list[dict[str, Any]], stderr_tail: list[str]) -> dict[str, Any]:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        for event in events:
            if event.get("event") == "ready":
                return event
        if server.poll() is not None:
            time.sleep(0.2)  # let the readers drain
            why = next((l for l in reversed(stderr_tail) if "error" in l.lower()), stderr_tail[-1] if stderr_tail else "")
            raise DemoError(f"orion serve exited with code {server.returncode} before it was ready: {why}")
        time.sleep(0.1)
    raise DemoError(f"orion serve was not ready after {SERVER_START_TIMEOUT:.0f} s")


def _stop(server: subprocess.Popen) -> str:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return "SIGKILL"
    return "SIGTERM"
