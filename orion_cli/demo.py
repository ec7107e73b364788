"""orion's main job on the built-in default model, end to end, with no arguments and no network.

The preparation is the shipped pipeline configs/demo.yaml (reference model ->
q4 with --test, fp32 -> 4 shards, both registered in WORKDIR/models.json), so a
second run skips what is already up to date. Then `orion serve` runs as a real
process on the sharded model with tensor parallelism, answers one chat
completion over HTTP on 127.0.0.1, and is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import signal
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
    reference = inspect_model_dir(reference_dir)
    quantized_meta = json.loads((Path(outputs["quantize"]) / "metadata.json").read_text())
    entries = Registry(registry_path).entries()
    with progress.stage(f"Serving {SERVED_KEY} with tp={tp} and asking one chat completion"):
        served = ask_one_question(registry_path, SERVED_KEY, tp, settings.serve.backend)

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


def ask_one_question(registry_path: Path, key: str, tp: int, backend: str) -> dict[str, Any]:
    """Start `orion serve` as a child process, ask one chat completion, stop it with SIGTERM."""
    import httpx

    from .serve.process import ServerProcess

    server = ServerProcess(key, "--registry", registry_path, "--tp", tp, "--host", "127.0.0.1", "--port", "0",
                           "--backend", backend)
    with server:
        try:
            ready = server.wait_event("ready", SERVER_START_TIMEOUT)
        except RuntimeError:
            why = next((l for l in reversed(server.stderr_lines) if "error" in l.lower()),
                       server.stderr_lines[-1] if server.stderr_lines else "no output")
            raise DemoError(f"orion serve did not become ready: {why}") from None
        started = time.perf_counter()
        response = httpx.post(f"{ready['url']}/v1/chat/completions", timeout=REQUEST_TIMEOUT, json={
            "model": ready.get("model", key), "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS, "temperature": 0,
        })
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise DemoError(f"orion serve answered HTTP {response.status_code}: {response.text[:200]}")
        body = response.json()
        server.stop(signal.SIGTERM)
        try:
            stopped = server.wait_event("stopped", 10)
        except RuntimeError:  # killed before it could say how it stopped
            stopped = {}
    tokens = body["usage"]["completion_tokens"]
    return {"url": ready["url"], "tp": tp, "backend": ready.get("backend"), "prompt": PROMPT,
            "answer": body["choices"][0]["message"]["content"], "completion_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
            "stopped_by": stopped.get("stopped_by"), "drained": stopped.get("drained")}
