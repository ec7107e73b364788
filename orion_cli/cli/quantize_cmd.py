"""orion quantize: a Hugging Face causal LM to a q4 / q3 / q2 weight-only ONNX model."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ..config import QuantizeSettings, override
from ..sizes import format_size
from ..producing import Output
from .common import JsonOpt, ModelOpt, VerboseOpt, emit, progress, use
from .options import producing_options, settings_options

TestOpt = Annotated[
    bool,
    typer.Option("--test", help="Compare with transformers' fp32 model: perplexity, KL, top-1 agreement, a completion."),
]


@producing_options
@settings_options(QuantizeSettings, "quantize")
def quantize(
    model: ModelOpt,
    test: TestOpt = False,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
    flags: dict[str, Any] | None = None,
    output: Output | None = None,
) -> None:
    """Quantize a causal LM to a weight-only ONNX model that runs in stock onnxruntime.

    Any causal LM optimum can export with past key values. The graph comes from
    optimum's export config without weights; every linear layer and the token
    embedding are quantized from the checkpoint a layer at a time into
    MatMulNBits / GatherBlockQuantized, so memory is bounded by a layer, not the
    model. Writes OUT/quantized (loadable with optimum's ORTModelForCausalLM) and
    OUT/metadata.json. docs/quantization.md says what each level does.

    Examples:

      orion quantize --model ./phi3 --output outputs/phi3-q4

      orion quantize --model phi3 --output outputs/phi3-q3 --level q3 --test --register phi3-q3

      orion quantize --model ./llama --output /tmp/llama-q2 --level q2 --method rtn --json

      orion quantize --model ./llama --output out/llama-q2-12 --level q2 --size-budget 0.12

      orion quantize --model ./llama-3-8b --output out/l3-q4 --calibration-minutes 60
    """
    state = use(json_output, verbose)
    settings = override(state.config().quantize, **(flags or {}))

    from ..quantize import quantize_model

    result = quantize_model(model, output, settings=settings, test=test, progress=progress())
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
    allocation = quant.get("allocation")
    if allocation:
        formats = ", ".join(f"{name}: {count}" for name, count in quant["formats_histogram"].items())
        within = "within" if allocation["within_budget"] else "OVER (every tensor at its cheapest)"
        table.add_row("formats (bits/block: tensors)", f"{formats}; {sizes['quantized_bytes'] / sizes['fp32_bytes']:.3f}x "
                                                        f"fp32, {within} the budget of {allocation['size_budget']}x")
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
    figures.add_row("size", format_size(sizes["fp32_bytes"]), format_size(sizes["quantized_bytes"]))
    console.print(figures)
    completion = quality["completion"]
    console.print(f"prompt: {completion['prompt']!r}")
    console.print(f"  fp32:      {completion['fp32']!r}")
    console.print(f"  quantized: {completion['quantized']!r}")
