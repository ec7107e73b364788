"""orion demo: the main job on the built-in reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import ForceOpt, JsonOpt, VerboseOpt, emit, progress, use


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", metavar="DIR", help="Where the demo writes its models and registry.")] = Path("orion-demo"),
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel ranks serving the sharded model.")] = 2,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run orion's main job on the built-in reference model, offline, from nothing to a served answer.

    Builds (or reuses from the cache) a small Llama trained here on the Python
    standard library's source; quantizes it to q4 with --test; shards the fp32
    model into 4; registers both in DIR/models.json (the steps of
    configs/demo.yaml, skipped when already up to date unless --force); serves
    the sharded model with --tp ranks on 127.0.0.1; asks it one chat completion;
    prints the answer and a summary; stops the server.

    Examples:

      orion demo

      orion demo --workdir /tmp/orion-demo --json
    """
    from ..workflow.demo import run_demo

    state = use(json_output, verbose)
    result = run_demo(workdir, state.config(), tp=tp, force=force, progress=progress())

    def render(console) -> None:
        served, quantized, quality = result.served, result.quantized, result.quantized["quality"]
        console.print(f"[bold]Q:[/bold] {served['prompt']}\n[bold]A:[/bold] {served['answer']}\n")
        table = Table(title=f"orion demo ({result.seconds:.0f} s)")
        for column in ("", "reference (fp32)", "q4 (ONNX)", "sharded (fp32)"):
            table.add_column(column)
        table.add_row("registry key", "", quantized["key"], result.sharded["key"])
        table.add_row("size", f"{result.reference['size_mb']:.1f} MB",
                      f"{quantized['size_mb']:.1f} MB (-{quantized['reduction_percent']:.0f}%)",
                      f"{result.sharded['size_mb']:.1f} MB in {result.sharded['shards']} shards")
        if quality:
            table.add_row("held-out perplexity", f"{quality['perplexity_fp32']:.2f}",
                          f"{quality['perplexity']:.2f} ({quality['perplexity_change']:+.1%})", "")
            table.add_row("KL / top-1 vs fp32", "", f"{quality['kl_divergence']:.4f} / {quality['top1_agreement']:.1%}", "")
        table.add_row("served", "", "", f"tp={served['tp']}, {served['tokens_per_second']} tokens/s")
        table.add_row("written to", result.reference["path"], quantized["path"], result.sharded["path"])
        console.print(table)
        console.print(f"registry: {result.registry}")

    emit(result.as_dict(), render)
