"""orion demo: the main job on the built-in reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import JsonOpt, VerboseOpt, emit, progress, use


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", metavar="DIR", help="Where the demo writes its registry and outputs.")] = Path("orion-demo"),
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run orion's main job on the built-in reference model, offline.

    Builds (or reuses from the cache) a small Llama trained here on the Python
    standard library's source, and registers it in DIR/models.json.

    Example:

      orion demo --workdir /tmp/orion-demo --json
    """
    from ..demo import run_demo

    state = use(json_output, verbose)
    result = run_demo(workdir, state.config().cache_path, progress=progress())

    def render(console) -> None:
        table = Table(title="orion demo")
        table.add_column("item")
        table.add_column("value")
        ref = result.reference
        table.add_row("reference model", str(result.reference_model))
        table.add_row("parameters", f"{ref.get('parameters', 0) / 1e6:.2f} M")
        table.add_row("held-out perplexity", f"{ref.get('heldout_perplexity', float('nan')):.2f}")
        table.add_row("size", f"{ref.get('size_mb', 0):.1f} MB")
        table.add_row("registry", str(result.registry))
        table.add_row("time", f"{result.seconds:.1f} s")
        console.print(table)

    emit(result.as_dict(), render)
