"""orion run: pipelines of steps from a YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import UsageError
from .common import ForceOpt, JsonOpt, RegistryOpt, VerboseOpt, emit, progress, use


def run(
    pipeline_file: Annotated[Path, typer.Argument(metavar="PIPELINE.yaml", help="Pipeline file (see configs/pipeline.yaml).", show_default=False)],
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="NAME=VALUE", help="Override a variable of the pipeline's vars: block (repeatable).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, with every reference resolved, and run nothing.")] = False,
    force: ForceOpt = False,
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run a declared sequence of steps: merge, quantize, shard, register, and optionally serve last.

    Each step's output feeds the next by reference (${steps.ID.output}). A step
    whose output exists with the same inputs (sha256 in its metadata.json) and
    parameters is skipped; --force runs every step again. A failing step stops the
    run with a non-zero exit naming the step; earlier outputs stay in place.

    Examples:

      orion run configs/pipeline.yaml --dry-run

      orion run configs/pipeline.yaml --set model=./my-llama --set out=outputs/my-llama

      orion run configs/workflows/specialize.yaml --set general=./general --set specialist=./code --json
    """
    from ..workflow import RunContext, load_pipeline, run_pipeline

    state = use(json_output, verbose)
    overrides = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--set {item!r}: write NAME=VALUE")
        overrides[name] = value
    pipeline = load_pipeline(pipeline_file, overrides)
    config = state.config()
    ctx = RunContext(pipeline, state.registry_path(registry), config.cache_path, config, force=force,
                     dry_run=dry_run, progress=progress())
    reports = run_pipeline(ctx)

    def render(console) -> None:
        table = Table(title=f"pipeline {pipeline.name}" + (" (dry run)" if dry_run else ""))
        for column in ("step", "kind", "action", "input", "output", "parameters", "time"):
            table.add_column(column)
        for report in reports:
            source = report.detail.get("model") or ", ".join(report.detail.get("models", []))
            settings = " ".join(f"{k}={_shown(v)}" for k, v in report.detail.items() if k not in ("model", "models", "output"))
            table.add_row(report.id, report.kind, report.action, source, report.output or "", settings,
                          f"{report.seconds:.1f} s" if report.action == "run" else "")
        console.print(table)

    emit({"pipeline": pipeline.name, "file": str(pipeline_file), "dry_run": dry_run,
          "steps": [r.as_dict() for r in reports]}, render)


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) and (not value or any(c.isspace() for c in value)) else str(value)
