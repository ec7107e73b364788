"""orion merge: merge models with mergekit, from flags or a mergekit YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer
from rich.table import Table

from ..config import MergeSettings, override
from ..errors import UsageError
from ..producing import Output
from .common import JsonOpt, VerboseOpt, emit, progress, use
from .options import producing_options, settings_options, variadic

# --models A B C and --ratios 0.7 0.3 take several values each, as the scripts users had did.
MergeCommand = variadic("--models", "--ratios")


@producing_options
@settings_options(MergeSettings, "merge")
def merge(
    models: Annotated[Optional[List[str]], typer.Option(
        "--models", metavar="DIR|KEY ...", show_default=False,
        help="Models to merge, as directories or registry keys: --models A B [C ...].")] = None,
    ratios: Annotated[Optional[List[float]], typer.Option(
        "--ratios", metavar="R ...", show_default=False,
        help="One weight >= 0 per model (default: equal). linear normalizes them; slerp takes t = second / sum.")] = None,
    base: Annotated[Optional[str], typer.Option(
        "--base", metavar="DIR|KEY", show_default=False,
        help="Base model of ties and dare task vectors (default: the first of --models).")] = None,
    merge_config: Annotated[Optional[Path], typer.Option(
        "--config", metavar="FILE", show_default=False,
        help="A mergekit YAML, taken as is, instead of --models/--ratios/--method/--base/--density/--dtype.")] = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
    flags: dict[str, Any] | None = None,
    output: Output | None = None,
) -> None:
    """Merge models with mergekit: linear, slerp, ties, dare (dare_ties) or dare_linear.

    Models are local directories or registry keys; nothing is downloaded. Inputs
    are checked before anything is written (architectures, and tensor shapes from
    the weight headers). The output holds the merged safetensors weights,
    config.json, the base (or first) model's tokenizer, mergekit_config.yml (the
    exact mergekit configuration, runnable with --config or mergekit-yaml) and
    metadata.json (every input's sha256, all parameters, mergekit's version).
    See docs/merge.md.

    Examples:

      orion merge --models ./chat ./code --ratios 0.7 0.3 --output merged

      orion merge --models base ft-a ft-b --ratios 0 0.5 0.5 --method ties --density 0.5 -o out

      orion merge --models ./a ./b --ratios 0.5 0.5 --method slerp --dtype bfloat16 -o out --register ab

      orion merge --config merge.yml --output out --json
    """
    from ..merge import merge_from_config, merge_models

    state = use(json_output, verbose)
    if not state.verbose:
        # transformers resets its logger's level when mergekit first imports it, so
        # setup_logging's level does not hold; its own variable does.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    flags = flags or {}
    settings = override(state.config().merge, **flags)
    _check_combinations(merge_config, models, ratios, base, flags, settings.method)
    if merge_config is not None:
        result = merge_from_config(merge_config, output, settings=settings, progress=progress())
    else:
        result = merge_models(models, output, ratios=ratios, base=base, settings=settings, progress=progress())

    def render(console) -> None:
        table = Table(title=f"orion merge ({result.method}, mergekit {result.mergekit_version})")
        table.add_column("input")
        table.add_column("sha256 of its weights")
        for source in result.sources:
            table.add_row(source.get("key") or source["path"], source["sha256"][:16] + "…")
        console.print(table)
        console.print(f"merged into [bold]{result.output}[/] ({', '.join(result.weight_files)}) in {result.seconds:.1f} s")
        if result.registered:
            console.print(f"registered as [bold]{result.registered}[/] in {output.registry}")

    emit(result.as_dict(), render)


def _check_combinations(merge_config, models, ratios, base, flags: dict[str, Any], method: str) -> None:
    from ..merge import TASK_VECTOR_METHODS

    given = {"--models": models, "--ratios": ratios, "--method": flags.get("method"), "--base": base,
             "--density": flags.get("density"), "--dtype": flags.get("dtype")}
    if merge_config is not None:
        clash = next((flag for flag, value in given.items() if value is not None and value != []), None)
        if clash is not None:
            raise UsageError(f"--config {merge_config} holds the whole merge; drop {clash} (or drop --config)")
        return
    if not models:
        raise UsageError("give the models to merge (--models A B ...) or a mergekit YAML (--config FILE)")
    if flags.get("density") is not None and method not in TASK_VECTOR_METHODS:
        raise UsageError(f"--density applies to ties, dare and dare_linear, not to --method {method}")
