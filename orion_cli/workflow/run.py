"""Running a pipeline: each step resolved, skipped when its output is up to date, else its one library call.

A step's output is up to date when the provenance the producing frame wrote
into it records the same operation, the same inputs (by the sha256 of their
weights) and the parameters this step would record now (config defaults
included), so a changed input, step parameter or config value reruns it. A
failing step stops the run; the outputs of earlier steps stay in place (each
was written atomically).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import OrionConfig
from ..errors import OrionError, describe
from ..modeldir import hash_files, inspect_model_dir, weights_digest
from ..producing import Output, recorded_provenance
from ..progress import NULL_PROGRESS, ProgressReporter
from ..provenance import jsonable
from ..registry import Registry, resolve_model_ref
from .pipeline import Pipeline, Step, substituted, validated
from .steps import Prepared


class StepFailedError(OrionError):
    """A step of a pipeline failed; earlier steps' outputs stay in place."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunContext:
    pipeline: Pipeline
    registry: Path
    cache_dir: Path
    config: OrionConfig  # the resolved config: what a step leaves out
    force: bool = False
    dry_run: bool = False
    progress: ProgressReporter = NULL_PROGRESS
    _reference: Path | None = None

    def output(self, path: Path | None) -> Output:
        """Where a step writes: it replaces its own earlier output (that is how a stale step reruns)."""
        return Output(path, force=True, registry=self.registry, output_root=self.config.output_root)

    def reference_model(self) -> Path:
        """The built-in reference model; a dry run names its cache directory without building it."""
        from ..reference.model import ensure_reference_model, reference_model_dir

        if self.dry_run:
            return reference_model_dir(self.cache_dir)
        if self._reference is None:
            self._reference = ensure_reference_model(self.cache_dir, progress=self.progress)
        return self._reference


@dataclass
class StepReport:
    id: str
    kind: str
    action: Literal["run", "skip", "plan"]
    output: str | None
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "action": self.action, "output": self.output,
                "seconds": round(self.seconds, 2), "detail": self.detail}


def resolve_step(step: Step, ctx: RunContext, done: dict[str, Path | None]) -> Prepared:
    """Substitute references, validate the step's parameters and prepare its call."""

    def step_output(step_id: str) -> str:
        if done.get(step_id) is None:
            raise OrionError(f"step '{step.id}': step '{step_id}' has no output to refer to")
        return str(done[step_id])

    values = substituted(step.raw, ctx.pipeline.variables, lambda: str(ctx.reference_model()), step_output)
    step.params = validated(step, values, f"pipeline file {ctx.pipeline.path}")
    if step.kind.has_output:
        output = getattr(step.params, "output")
        step.output = Path(output) if output else ctx.pipeline.output_root / step.id
    return step.kind.prepare(step.params, step.output, ctx)


def run_pipeline(ctx: RunContext) -> list[StepReport]:
    """Run (or with ctx.dry_run, plan) every step in order."""
    reports: list[StepReport] = []
    done: dict[str, Path | None] = {}
    for step in ctx.pipeline.steps:
        try:
            prepared = resolve_step(step, ctx, done)
            shown = jsonable(prepared.shown)
            output = str(step.output) if step.output is not None else None
            if ctx.dry_run or (not ctx.force and _up_to_date(step, prepared, ctx)):
                reports.append(StepReport(step.id, step.kind.name, "plan" if ctx.dry_run else "skip", output,
                                          detail=shown))
                done[step.id] = step.output
                continue
            started = time.perf_counter()
            with ctx.progress.stage(f"step {step.id} ({step.kind.name})"):
                produced = prepared.call(ctx.progress)
            done[step.id] = produced if produced is not None else step.output
            reports.append(StepReport(step.id, step.kind.name, "run", output, time.perf_counter() - started, shown))
        except Exception as exc:  # noqa: BLE001 - any failure stops the run, named by its step
            message, exit_code = describe(exc)
            raise StepFailedError(f"step '{step.id}' ({step.kind.name}) failed: {message}", exit_code) from exc
    return reports


def _up_to_date(step: Step, prepared: Prepared, ctx: RunContext) -> bool:
    if step.kind.name == "register":
        return _registered_unchanged(step, ctx)
    if prepared.parameters is None or step.output is None or not step.output.exists():
        return False
    recorded = recorded_provenance(step.output)
    if recorded.get("operation") != step.kind.operation:
        return False
    try:
        wanted = sorted(_digest(ref, ctx) for ref in step.kind.inputs(step.params))
    except OrionError:
        return False  # an input that cannot be read now: let the step itself report it
    if wanted != sorted(source.get("sha256") for source in recorded.get("sources", [])):
        return False
    have = recorded.get("parameters", {})
    return all(have.get(key, "<not recorded>") == value for key, value in jsonable(prepared.parameters).items())


def _digest(ref: str, ctx: RunContext) -> str:
    path, _ = resolve_model_ref(ref, ctx.registry)
    digest, _ = weights_digest(inspect_model_dir(path))
    return digest


def _registered_unchanged(step: Step, ctx: RunContext) -> bool:
    entries = Registry(ctx.registry).entries()
    if step.params.key not in entries:
        return False
    try:
        model = inspect_model_dir(resolve_model_ref(step.params.model, ctx.registry)[0])
    except OrionError:
        return False
    current = {(f.path, f.sha256) for f in hash_files(model.path)}
    recorded = {(f["path"], f["sha256"]) for f in entries[step.params.key].get("files", [])}
    return current == recorded
