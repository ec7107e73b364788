"""orion merge: merge models with mergekit, from flags or a mergekit YAML."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, List, Optional, Sequence

import typer
from rich.table import Table
from typer.core import TyperCommand

from ..errors import UsageError
from .common import ForceOpt, JsonOpt, OutputOpt, RegisterOpt, RegistryOpt, VerboseOpt, emit, progress, use

_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class MergeCommand(TyperCommand):
    """Lets --models and --ratios take several values (--models A B C), as the scripts users had did.

    click gives an option one value per occurrence; the values after these
    options are spread into one occurrence each before click parses them.
    """

    variadic = ("--models", "--ratios")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_variadic(args, self.variadic))


def spread_variadic(args: Sequence[str], options: Sequence[str]) -> list[str]:
    """['--models', 'a', 'b'] -> ['--models', 'a', '--models', 'b'].

    A value is any argument up to the next option; negative numbers count as values,
    so that '--ratios 0.5 -0.5' reaches the check that names the negative ratio.
    """
    spread: list[str] = []
    current: str | None = None
    taken = 0
    for index, arg in enumerate(args):
        if arg == "--":
            spread.extend(args[index:])
            break
        if current is not None and (not arg.startswith("-") or _NUMBER.match(arg)):
            spread += [current, arg]
            taken += 1
            continue
        if current is not None and taken == 0:
            spread.append(current)  # no value: let click report the missing argument
        current, taken = (arg, 0) if arg in options else (None, 0)
        if current is None:
            spread.append(arg)
    if current is not None and taken == 0:
        spread.append(current)
    return spread


def merge(
    models: Annotated[Optional[List[str]], typer.Option(
        "--models", metavar="DIR|KEY ...", show_default=False,
        help="Models to merge, as directories or registry keys: --models A B [C ...].")] = None,
    ratios: Annotated[Optional[List[float]], typer.Option(
        "--ratios", metavar="R ...", show_default=False,
        help="One weight >= 0 per model (default: equal). linear normalizes them; slerp takes t = second / sum.")] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", metavar="METHOD", show_default=False,
        help="linear | slerp | ties | dare | dare_linear (default: merge.method, linear).")] = None,
    base: Annotated[Optional[str], typer.Option(
        "--base", metavar="DIR|KEY", show_default=False,
        help="Base model of ties and dare task vectors (default: the first of --models).")] = None,
    density: Annotated[Optional[float], typer.Option(
        "--density", show_default=False,
        help="Fraction of each task vector kept by ties and dare (default: merge.density, 0.5).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", show_default=False, help="Seed of dare's random drop (default: merge.seed, 0).")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", metavar="DTYPE", show_default=False,
        help="float32 | float16 | bfloat16: dtype of the merged weights (default: merge.dtype, float32).")] = None,
    merge_config: Annotated[Optional[Path], typer.Option(
        "--config", metavar="FILE", show_default=False,
        help="A mergekit YAML, taken as is, instead of --models/--ratios/--method/--base/--density/--dtype.")] = None,
    allow_crimes: Annotated[bool, typer.Option(
        "--allow-crimes", help="Merge even when architectures or tensor shapes differ, as mergekit's --allow-crimes.")] = False,
    output: OutputOpt = None,
    force: ForceOpt = False,
    register: RegisterOpt = None,
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
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
    settings = state.config().merge
    registry_path = state.registry_path(registry)
    chosen_method = method if method is not None else settings.method
    _check_combinations(merge_config, models, ratios, method, base, density, dtype, chosen_method)
    common = dict(
        seed=seed if seed is not None else settings.seed,
        allow_crimes=allow_crimes or settings.allow_crimes,
        force=force,
        register=register,
        registry_path=registry_path,
        max_shard_size=settings.max_shard_size,
        progress=progress(),
    )
    if merge_config is not None:
        target = output or Path(state.config().output_root) / f"merge-{merge_config.stem}"
        result = merge_from_config(merge_config, target, **common)
    else:
        names = "-".join(Path(str(m)).name or str(m) for m in models)
        target = output or Path(state.config().output_root) / f"merge-{chosen_method}-{names}"
        result = merge_models(
            models, target, ratios=ratios, method=chosen_method, base=base,
            density=density if density is not None else settings.density,
            dtype=dtype if dtype is not None else settings.dtype,
            **common,
        )

    def render(console) -> None:
        table = Table(title=f"orion merge ({result.method}, mergekit {result.mergekit_version})")
        table.add_column("input")
        table.add_column("sha256 of its weights")
        for source in result.sources:
            table.add_row(source.get("key") or source["path"], source["sha256"][:16] + "…")
        console.print(table)
        console.print(f"merged into [bold]{result.output}[/] ({', '.join(result.weight_files)}) in {result.seconds:.1f} s")
        if result.registered:
            console.print(f"registered as [bold]{result.registered}[/] in {registry_path}")

    emit(result.as_dict(), render)


def _check_combinations(merge_config, models, ratios, method, base, density, dtype, chosen_method) -> None:
    from ..merge import TASK_VECTOR_METHODS

    given = {"--models": models, "--ratios": ratios, "--method": method, "--base": base,
             "--density": density, "--dtype": dtype}
    if merge_config is not None:
        clash = next((flag for flag, value in given.items() if value is not None and value != []), None)
        if clash is not None:
            raise UsageError(f"--config {merge_config} holds the whole merge; drop {clash} (or drop --config)")
        return
    if not models:
        raise UsageError("give the models to merge (--models A B ...) or a mergekit YAML (--config FILE)")
    if density is not None and chosen_method not in TASK_VECTOR_METHODS:
        raise UsageError(f"--density applies to ties, dare and dare_linear, not to --method {chosen_method}")
