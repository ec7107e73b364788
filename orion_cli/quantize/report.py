"""metadata.json of a quantized model: the recipe, what each tensor got, sizes, durations, tools, quality."""

from __future__ import annotations

from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ..modeldir import hash_files

TOOLS = ("onnxruntime", "onnx", "optimum", "optimum-onnx", "transformers", "torch", "numpy")


def _versions() -> dict[str, str]:
    import orion_cli

    versions = {"orion": orion_cli.__version__}
    for name in TOOLS:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def _onnx_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx_data")))


def quantize_metadata(*, source, recipe, block, method, plan, embedding_method, tensors, allocation, texts,
                      parameter_count, quant_dir: Path, quality, watch, accuracy_level) -> dict[str, Any]:
    stored_tensors = [t for t in tensors if "tied_to" not in t]  # a tied embedding's table is the head's
    elements = sum(t["shape"][0] * t["shape"][1] for t in stored_tensors)
    nominal = sum(t["bits"] * t["shape"][0] * t["shape"][1] for t in stored_tensors) / elements
    stored = sum(t["bytes"] for t in tensors)
    source_bytes = source.weight_bytes
    quantized_bytes = _onnx_bytes(quant_dir)
    calibration = plan.as_dict()
    if texts is not None and len(texts.calibration):
        calibration["text"] = texts.calibration_source
    quantization: dict[str, Any] = {
        "level": recipe.name,
        "bits": round(nominal, 4),
        "method": plan.linear_method,
        "block_size": block,
        "embedding_method": embedding_method,
        "requested_method": method,
        "recipe": recipe.summary,
        "effective_bits": round(8 * stored / elements, 4),
        "accuracy_level": accuracy_level,
        "operators": sorted({"GatherBlockQuantized" if t["op"] == "Gather" else "MatMulNBits" for t in tensors}),
        "tensors_quantized": len(tensors),
        "methods_histogram": {m: sum(1 for t in tensors if t["method"] == m) for m in sorted({t["method"] for t in tensors})},
        "bits_histogram": {str(b): sum(1 for t in tensors if t["bits"] == b) for b in sorted({t["bits"] for t in tensors})},
        "calibration": calibration,
    }
    if allocation:
        quantization["allocation"] = {k: v for k, v in allocation.items() if k not in ("format_of", "predicted_kl")}
        quantization["formats_histogram"] = {
            f"{bits}/{block}": sum(1 for t in tensors if (t["bits"], t["block_size"]) == (bits, block))
            for bits, block in sorted({(t["bits"], t["block_size"]) for t in tensors})}
    document = {
        "quantization": quantization,
        "sizes": {
            "source_bytes": source_bytes,
            "fp32_bytes": parameter_count * 4,
            "quantized_bytes": quantized_bytes,
            "fraction_of_source": round(quantized_bytes / source_bytes, 6),
            "reduction_percent": round(100 * (1 - quantized_bytes / source_bytes), 3),
            "quantized_weight_bytes": stored,
            "fp32_weight_bytes": elements * 4,
        },
        "durations": dict(watch.durations),
        "tools": _versions(),
        "tensors": tensors,
        "files": [
            {**record.as_dict(), "path": f"quantized/{record.path}"} for record in hash_files(quant_dir)
        ],
    }
    if quality is not None:
        document["quality"] = quality
    return document


def tensor_record(site, quantized, predicted: dict | None = None, tied_to: str | None = None) -> dict[str, Any]:
    """One entry of metadata.json's `tensors`: the site, the format it got, its predicted KL in each format.
    A tied embedding reads the blocks of the head `tied_to`: its bytes are the head's, counted there."""
    record = {
        "name": site.name,
        "parameter": site.param,
        "op": site.op,
        "role": site.role,
        "shape": [site.k, site.n],
        "bits": quantized.bits,
        "block_size": quantized.block_size,
        "method": quantized.method,
        "bytes": 0 if tied_to else quantized.nbytes,
        "fp32_bytes": 0 if tied_to else site.elements * 4,
    }
    if tied_to:
        record["tied_to"] = tied_to
    if predicted and len(predicted) > 1:
        record["predicted_kl_by_format"] = {str(f): float(f"{kl:.4g}") for f, kl in predicted.items()}
    return record
