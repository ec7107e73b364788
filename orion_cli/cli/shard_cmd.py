"""orion shard: split a model into shards with a manifest, or verify a sharded directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..config import ShardSettings, override
from ..errors import ConfigError, UsageError
from ..sizes import format_size
from ..producing import Output
from .common import JsonOpt, VerboseOpt, emit, info, progress, use
from .options import producing_options, settings_options

OptionalModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", metavar="DIR|KEY", help="Model directory or registry key to shard.", show_default=False),
]
VerifyOpt = Annotated[
    Optional[Path],
    typer.Option("--verify", metavar="DIR", show_default=False,
                 help="Re-hash the files of a sharded directory against its shard_manifest.json, and do nothing else."),
]


@producing_options
@settings_options(ShardSettings, "shard")
def shard(
    model: OptionalModelOpt = None,
    verify: VerifyOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
    flags: dict[str, Any] | None = None,
    output: Output | None = None,
) -> None:
    """Split a model into shards in execution order, for progressive loading.

    Writes shard_NN.safetensors (embeddings and first layers in shard_00, the
    head last), shard_manifest.json (sizes, sha256, tensors and layer range of
    each shard), model.safetensors.index.json for transformers, SHARDING_INFO.md
    and metadata.json. Reads model.safetensors, sharded safetensors checkpoints
    and pytorch_model.bin; an ONNX model (what `orion quantize` writes) gets its
    external data split into shard_NN.onnx_data beside a rewritten model.onnx.

    Examples:

      orion shard --model ./phi3 --output ./phi3-sharded --shards 4

      orion shard --model phi3-q4 --output deploy/phi3-q4 --max-shard-size 500 --register phi3-prod

      orion shard --verify deploy/phi3-q4
    """
    state = use(json_output, verbose)
    flags = flags or {}
    if verify is not None:
        _verify(verify, model=model, output=output.path, register=output.register, **flags)
        return
    if model is None:
        raise UsageError("--model DIR|KEY is required (or --verify DIR to check a sharded directory)")
    config = state.config()
    if all(value is None for value in flags.values()):
        if config.shard.shards is not None and config.shard.max_shard_size is not None:
            raise ConfigError("config keys shard.shards and shard.max_shard_size are both set; keep one, or pass a flag")
        settings = config.shard
    else:  # a flag chooses the strategy: the config's other one does not apply
        settings = override(ShardSettings(shards=None, max_shard_size=None), **flags)

    from ..shard import shard_model

    result = shard_model(model, output, settings=settings, progress=progress())
    for warning in result.warnings:
        info(f"[yellow]warning:[/] {warning}")

    def render(console) -> None:
        table = Table(title=f"{result.output} ({result.weight_format})")
        for column in ("shard", "size", "tensors", "layers", "contains"):
            table.add_column(column, justify="right" if column in ("size", "tensors") else "left")
        for record in result.shards:
            layers = f"{record.layers[0]}-{record.layers[1]}" if record.layers else "-"
            table.add_row(record.file, format_size(record.bytes), str(len(record.tensors)), layers, ", ".join(record.contains))
        console.print(table)
        tied = f"; tied weights stored once ({', '.join(result.tied_dropped)})" if result.tied_dropped else ""
        console.print(f"{len(result.shards)} shards, {format_size(result.total_bytes)} in {result.seconds:.1f} s{tied}")
        if result.registered:
            console.print(f"registered as [bold]{result.registered}[/]")

    emit(result.as_dict(), render)


def _verify(directory: Path, **others) -> None:
    given = [f"--{name.replace('_', '-')}" for name, value in others.items() if value is not None]
    if given:
        raise UsageError(f"--verify DIR only checks a sharded directory; drop {', '.join(given)}")
    from ..shard import verify_sharded_dir

    result = verify_sharded_dir(directory, progress=progress())
    emit(result.as_dict(), lambda console: console.print(
        f"{directory}: {len(result.files)} files, {format_size(result.bytes)}, all match shard_manifest.json"
    ))
