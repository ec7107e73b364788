"""orion's main job on the built-in default model, end to end, with no arguments and no network."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .progress import NULL_PROGRESS, ProgressReporter
from .reference import ensure_reference_model
from .modeldir import inspect_model_dir
from .registry import register_model

REFERENCE_KEY = "reference"


@dataclass
class DemoResult:
    workdir: Path
    registry: Path
    reference_model: Path
    reference: dict[str, Any]
    registered: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "registry": str(self.registry),
            "reference_model": str(self.reference_model),
            "reference": self.reference,
            "registered": self.registered,
            "seconds": round(self.seconds, 1),
        }


def run_demo(workdir: Path, cache_dir: Path, progress: ProgressReporter = NULL_PROGRESS) -> DemoResult:
    started = time.perf_counter()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    registry_path = workdir / "models.json"

    model_dir = ensure_reference_model(cache_dir, progress=progress)
    with progress.stage("Registering the reference model"):
        entry = register_model(model_dir, REFERENCE_KEY, registry_path, force=True,
                               name="orion reference model (Llama, fp32)")
    reference = (inspect_model_dir(model_dir).metadata or {}).get("reference", {})
    return DemoResult(
        workdir=workdir,
        registry=registry_path,
        reference_model=model_dir,
        reference=reference | {"size_mb": entry["size_mb"]},
        registered={REFERENCE_KEY: str(model_dir)},
        seconds=time.perf_counter() - started,
    )
