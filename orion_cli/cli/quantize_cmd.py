"""orion quantize: a Hugging Face causal LM to a q4 / q3 / q2 weight-only ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..sizes import format_size
from .common import ForceOpt, JsonOpt, ModelOpt, OutputOpt, RegisterOpt, RegistryOpt, VerboseOpt, emit, pick, progress, use

LevelOpt = Annotated[
    Optional[str],
    typer.Option("--level", "-l", metavar="q4|q3|q2", show_default=False,
                 help="q4: 4 bits; q3: 2 or 4 bits per tensor, 3.0 on average; q2: 2 bits (config: quantize.level, q4)."),
]
MethodOpt = Annotated[
    Optional[str],
    typer.Option("--method", metavar="auto|gptq|rtn|kquant|hqq", show_default=False,
                 help="Algorithm; auto is GPTQ for linear layers and k-quant for the embedding (config: quantize.method)."),
]
BlockSizeOpt = Annotated[
    Optional[int],
    typer.Option("--block-size", metavar="N", show_default=False,
                 help="Weights sharing one scale: 16..256, a power of two (default: the level's, 32 or 64)."),
]
TestOpt = Annotated[
    bool,
    typer.Option("--test", help="Compare with the fp32 model in onnxruntime: perplexity, KL, top-1 agreement, a completion."),
]
EvalTextOpt = Annotated[
    Optional[Path],
    typer.Option("--eval-text", metavar="FILE", show_default=False,
                 help="Text to calibrate on (its first windows) and evaluate on (the rest) (config: quantize.eval_text)."),
]
LowCpuMemOpt = Annotated[
    Optional[bool],
    typer.Option("--low-cpu-mem/--no-low-cpu-mem", show_default=False,
                 help="Export in a child process to external data and read weights one tensor at a time."),
]
KeepIntermediateOpt = Annotated[
    Optional[bool],
    typer.Option("--keep-intermediate/--no-keep-intermediate", show_default=False,
                 help="Keep the fp32 ONNX export in OUT/onnx."),
]


def quantize(
    model: ModelOpt,
    output: OutputOpt = None,
    level: LevelOpt = None,
    test: TestOpt = False,
    eval_text: EvalTextOpt = None,
    block_size: BlockSizeOpt = None,
    method: MethodOpt = None,
    low_cpu_mem: LowCpuMemOpt = None,
    keep_intermediate: KeepIntermediateOpt = None,
    force: ForceOpt = False,
    register: RegisterOpt = None,
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Quantize a causal LM to a weight-only ONNX model that runs in stock onnxruntime.

    Exports with optimum (with past key values), quantizes every linear layer and
    the token embedding to MatMulNBits / GatherBlockQuantized, and writes
    OUT/quantized (loadable with optimum's ORTModelForCausalLM) and
    OUT/metadata.json. docs/quantization.md says what each level does.

    Examples:

      orion quantize --model ./phi3 --output outputs/phi3-q4

      orion quantize --model phi3 --output outputs/phi3-q3 --level q3 --test --register phi3-q3

      orion quantize --model ./llama --output /tmp/llama-q2 --level q2 --low-cpu-mem --json
    """
    state = use(json_output, verbose)
    settings = state.config().quantize
    eval_path = eval_text if eval_text is not None else (Path(settings.eval_text) if settings.eval_text else None)

    from ..quantize import quantize_model

    result = quantize_model(
        model, output,
        level=pick(level, settings.level),
        method=pick(method, settings.method),
        block_size=pick(block_size, settings.block_size),
        test=test,
        eval_text=eval_path,
        low_cpu_mem=pick(low_cpu_mem, settings.low_cpu_mem),
        keep_intermediate=pick(keep_intermediate, settings.keep_intermediate),
        force=force,
        register=register,
        registry_path=state.registry_path(registry),
        output_root=state.config().output_root,
        calibration_tokens=settings.calibration_tokens,
        eval_tokens=settings.eval_tokens,
        prompt=settings.prompt,
        progress=progress(),
    )
    emit(result.as_dict(), lambda console: _render(console, result))


def _render(console, result) -> None:
    meta = result.metadata
    quant, sizes = meta["quantization"], meta["sizes"]
    table = Table(title=f"{result.model_dir}")
    table.add_column("")
    table.add_column("value")
    table.add_row("level", f"{quant['level']}: {quant['recipe']}")
    table.add_row("method", f"{quant['method']} (embedding: {quant['embedding_method']})")
    table.add_row("bits per weight", f"{quant['bits']:.2f} ({quant['effective_bits']:.2f} with scales and zero points)")
    table.add_row("size", f"{format_size(sizes['source_bytes'])} -> {format_size(sizes['quantized_bytes'])} "
                          f"({sizes['reduction_percent']:.1f}% smaller)")
    table.add_row("time", f"{meta['durations']['total']:.1f} s")
    if result.registered:
        table.add_row("registered", result.registered)
    console.print(table)
    quality = meta.get("quality")
    if not quality:
        return
    figures = Table(title=f"against fp32 on {quality['eval']['tokens']} tokens of {quality['eval']['source']}")
    for column in ("", "fp32", result.metadata["quantization"]["level"]):
        figures.add_column(column, justify="right")
    figures.add_row("perplexity", f"{quality['perplexity_fp32']:.3f}",
                    f"{quality['perplexity']:.3f} ({100 * quality['perplexity_change']:+.2f}%)")
    figures.add_row("KL divergence (nats/token)", "0", f"{quality['kl_divergence']:.5f}")
    figures.add_row("top-1 agreement", "100%", f"{100 * quality['top1_agreement']:.1f}%")
    figures.add_row("size", format_size(sizes["onnx_fp32_bytes"]), format_size(sizes["quantized_bytes"]))
    console.print(figures)
    completion = quality["completion"]
    console.print(f"prompt: {completion['prompt']!r}")
    console.print(f"  fp32:      {completion['fp32']!r}")
    console.print(f"  quantized: {completion['quantized']!r}")
