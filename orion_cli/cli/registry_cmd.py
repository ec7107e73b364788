"""orion register and orion models: the registry from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..registry import Registry, register_model
from ..sizes import format_size
from .common import ForceOpt, JsonOpt, RegistryOpt, VerboseOpt, emit, info, use

KeyArg = Annotated[str, typer.Argument(metavar="KEY", help="Registry key.", show_default=False)]

models_app = typer.Typer(
    name="models",
    help="List, show, validate and remove registry entries.",
    no_args_is_help=True,
)


def register(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="Model directory to register.", show_default=False)],
    key: Annotated[str, typer.Option("--id", metavar="KEY", help="Registry key of the new entry.", show_default=False)],
    name: Annotated[Optional[str], typer.Option("--name", help="Human-readable name (default: the model id).", show_default=False)] = None,
    model_id: Annotated[Optional[str], typer.Option("--model-id", help="The entry's id field (default: the directory name).", show_default=False)] = None,
    description: Annotated[Optional[str], typer.Option("--description", help="Free text stored with the entry.", show_default=False)] = None,
    force: ForceOpt = False,
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Add a model directory to the registry, with every field orion can fill.

    Reads config.json, the weights (*.safetensors, *.onnx, pytorch_model.bin),
    shard_manifest.json and metadata.json, hashes every file, validates the entry
    against models.schema.json and writes it atomically under a lock.

    Examples:

      orion register outputs/phi3-q4 --id phi3-q4 --name "Phi-3 mini, q4"

      orion register ./sharded --id prod --registry deploy/models.json --force --json
    """
    state = use(json_output, verbose)
    registry_path = state.registry_path(registry)
    entry = register_model(path, key, registry_path, force=force, model_id=model_id, name=name, description=description)
    result = {"key": key, "registry": str(registry_path), "entry": entry}
    emit(result, lambda console: console.print(
        f"registered [bold]{key}[/] ({entry['format']}, {entry.get('architecture', '?')}, "
        f"{format_size(entry['size_mb'] * 1e6)}) in {registry_path}"
    ))


@models_app.command("list", epilog="Example:  orion models list --registry deploy/models.json --json")
def list_models(registry: RegistryOpt = None, json_output: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """List the registry's entries."""
    state = use(json_output, verbose)
    registry_path = state.registry_path(registry)
    entries = Registry(registry_path).entries(missing_ok=False)

    def render(console) -> None:
        if not entries:
            console.print(f"no models in {registry_path}")
            return
        table = Table(title=str(registry_path))
        for column in ("key", "id", "format", "architecture", "quantization", "size", "base"):
            table.add_column(column)
        for key, entry in entries.items():
            quant = entry.get("quantization") or {}
            table.add_row(
                key, entry["id"], entry.get("format", ""), entry.get("architecture", ""),
                quant.get("level", ""), format_size(entry["size_mb"] * 1e6), entry["urls"]["base"],
            )
        console.print(table)

    emit({"registry": str(registry_path), "models": entries}, render)


@models_app.command("show", epilog="Example:  orion models show phi3-q4 --json")
def show_model(
    key: KeyArg,
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Show one entry in full."""
    state = use(json_output, verbose)
    registry_obj = Registry(state.registry_path(registry))
    entry = registry_obj.get(key)
    emit({"key": key, "path": str(registry_obj.resolve(entry["urls"]["base"])), "entry": entry})


@models_app.command("validate", epilog="Example:  orion models validate --check-files --json")
def validate_models(
    check_files: Annotated[bool, typer.Option("--check-files", help="Re-hash every file and compare with its recorded sha256.")] = False,
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Check the registry against models.schema.json and that its paths exist.

    Exits 1 when anything is wrong, naming the JSON path of each problem.
    """
    state = use(json_output, verbose)
    registry_path = state.registry_path(registry)
    registry_obj = Registry(registry_path)
    problems = registry_obj.problems(check_files=check_files)
    count = len(registry_obj.entries())
    emit(
        {"registry": str(registry_path), "valid": not problems, "entries": count, "problems": problems},
        lambda console: console.print(
            f"{registry_path}: {count} entries, valid" if not problems else "\n".join(problems)
        ),
    )
    if problems:
        info(f"orion: error: registry {registry_path}: invalid, {len(problems)} "
             f"problem{'s' if len(problems) > 1 else ''} (listed on stdout)")
        raise typer.Exit(1)


@models_app.command("remove", epilog="Example:  orion models remove old-q2")
def remove_model(
    key: KeyArg,
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Remove an entry from the registry (the model's files stay where they are)."""
    state = use(json_output, verbose)
    registry_path = state.registry_path(registry)
    entry = Registry(registry_path).remove(key)
    emit({"removed": key, "registry": str(registry_path), "entry": entry},
         lambda console: console.print(f"removed {key} from {registry_path}"))
