"""orion's main job on the built-in default model, end to end, with no arguments and no network.

The preparation is the shipped pipeline configs/demo.yaml (reference model ->
q4 with --test, fp32 -> 4 shards, both registered in WORKDIR/models.json), so a
second run skips what is already up to date. Then the sharded model is served
with tensor parallelism by the serve library call, in this process (torchrun's
agent, with real worker processes); a client thread asks one chat completion
over HTTP on 127.0.0.1 and then stops the server with SIGTERM, as a user's
signal would.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import OrionConfig
from ..errors import OrionError
from ..progress import NULL_PROGRESS, ProgressReporter
from ..resources import configs_dir

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


def run_demo(workdir: Path, config: OrionConfig, *, tp: int = 2, force: bool = False,
             progress: ProgressReporter = NULL_PROGRESS) -> DemoResult:
    """Prepare (or reuse) the demo's models in `workdir`, serve the sharded one, ask it one question."""
    from ..modeldir import inspect_model_dir
    from ..registry import Registry
    from .pipeline import load_pipeline
    from .run import RunContext, run_pipeline

    started = time.perf_counter()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    registry_path = workdir / "models.json"
    pipeline = load_pipeline(configs_dir() / DEMO_PIPELINE, {"out": str(workdir)})
    ctx = RunContext(pipeline, registry_path, config.cache_path, config, force=force, progress=progress)
    reports = run_pipeline(ctx)
    outputs = {r.id: r.output for r in reports if r.output}

    reference_dir = ctx.reference_model()
    reference = inspect_model_dir(reference_dir)
    quantized_meta = json.loads((Path(outputs["quantize"]) / "metadata.json").read_text())
    entries = Registry(registry_path).entries()
    with progress.stage(f"Serving {SERVED_KEY} with tp={tp} and asking one chat completion"):
        served = ask_one_question(registry_path, SERVED_KEY, tp, config)

    quality = quantized_meta.get("quality") or {}
    return DemoResult(
        workdir=workdir,
        registry=registry_path,
        steps=[r.as_dict() for r in reports],
        reference={"path": str(reference_dir), "size_mb": _mb(reference.weight_bytes),
                   **(reference.metadata or {}).get("reference", {})},
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


class _OneQuestion(threading.Thread):
    """Waits for the server's ready event, asks the question, then signals the server to stop."""

    def __init__(self, model: str):
        super().__init__(name="orion-demo-client", daemon=True)
        self.model = model
        self.ready = threading.Event()
        self.serving = threading.Event()  # set while serve() runs, so the signal never reaches anything else
        self.url: str | None = None
        self.backend: str | None = None
        self.answer: dict[str, Any] | None = None
        self.error: str | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "ready":
            self.url, self.backend = event["url"], event.get("backend")
            self.ready.set()

    def run(self) -> None:
        import httpx

        try:
            if not self.ready.wait(SERVER_START_TIMEOUT):
                self.error = f"orion serve was not ready after {SERVER_START_TIMEOUT:.0f} s"
                return
            started = time.perf_counter()
            response = httpx.post(f"{self.url}/v1/chat/completions", timeout=REQUEST_TIMEOUT, json={
                "model": self.model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": MAX_TOKENS, "temperature": 0,
            })
            seconds = time.perf_counter() - started
            if response.status_code != 200:
                self.error = f"orion serve answered HTTP {response.status_code}: {response.text[:200]}"
                return
            body = response.json()
            tokens = body["usage"]["completion_tokens"]
            self.answer = {"answer": body["choices"][0]["message"]["content"], "completion_tokens": tokens,
                           "seconds": round(seconds, 3),
                           "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None}
        except Exception as exc:  # noqa: BLE001 - reported by the main thread as the demo's failure
            self.error = f"the question failed: {type(exc).__name__}: {exc}"
        finally:
            if self.serving.is_set():
                os.kill(os.getpid(), signal.SIGTERM)


def ask_one_question(registry_path: Path, key: str, tp: int, config: OrionConfig) -> dict[str, Any]:
    """Serve `key` with `tp` ranks on 127.0.0.1 (any free port) until one chat completion is answered."""
    from ..config import override
    from ..serve import serve

    settings = override(config.serve, tp=tp, host="127.0.0.1", port=0, pp=1, nnodes=1, node_rank=0)
    client = _OneQuestion(key)
    client.start()
    client.serving.set()
    try:
        summary = serve(key, settings, codec=config.codec, registry=registry_path, cache_dir=config.cache_path,
                        on_event=client.on_event)
    finally:
        client.serving.clear()
        client.ready.set()  # a client still waiting gives up at once
    client.join(REQUEST_TIMEOUT)
    if client.answer is None:
        raise DemoError(client.error or "orion serve stopped before it answered")
    return {"url": client.url, "tp": tp, "backend": client.backend, "prompt": PROMPT, **client.answer,
            "stopped_by": summary.stopped_by, "drained": summary.drained}
