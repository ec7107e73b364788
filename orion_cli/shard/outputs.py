"""What `orion shard` writes beside the shards: manifest, index, metadata and SHARDING_INFO.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import HF_INDEX_FILE
from ..modeldir import MANIFEST_FILE, ModelDir
from ..provenance import utc_now
from .io import SourceTensor
from .load import MANIFEST_FORMAT, MANIFEST_VERSION
from ..sizes import format_size

INFO_FILE = "SHARDING_INFO.md"


@dataclass
class ShardRecord:
    index: int
    file: str
    bytes: int
    sha256: str
    tensors: list[str]
    tensor_bytes: int
    layers: tuple[int, int] | None
    contains: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "file": self.file,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "tensor_bytes": self.tensor_bytes,
            "layers": {"first": self.layers[0], "last": self.layers[1]} if self.layers else None,
            "contains": self.contains,
            "tensors": self.tensors,
        }


@dataclass
class ShardResult:
    output: Path
    weight_format: str
    strategy: dict[str, int]
    source: dict[str, Any]
    shards: list[ShardRecord]
    tensor_count: int
    tied_dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    registered: str | None = None
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "weight_format": self.weight_format,
            "strategy": self.strategy,
            "source": self.source,
            "total_bytes": self.total_bytes,
            "tensor_count": self.tensor_count,
            "tied_weights_dropped": self.tied_dropped,
            "warnings": self.warnings,
            "registered": self.registered,
            "seconds": round(self.seconds, 3),
            "shards": [{k: v for k, v in s.as_dict().items() if k != "tensors"} | {"tensor_count": len(s.tensors)}
                       for s in self.shards],
        }



def write_hf_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json, which transformers reads to find each tensor's file."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / HF_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_manifest(directory: Path, result: ShardResult, model_file: dict[str, Any] | None,
                   tensors: list[SourceTensor]) -> None:
    layers = [t.layer for t in tensors if t.layer is not None]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "weight_format": result.weight_format,
        "created_at": utc_now(),
        "orion_version": __version__,
        "source": result.source,
        "strategy": result.strategy,
        "total_bytes": result.total_bytes,
        "tensor_bytes": sum(t.nbytes for t in tensors),
        "tensor_count": len(tensors),
        "num_layers": max(layers) + 1 if layers else None,
        "tied_weights_dropped": result.tied_dropped,
        "loading_order": [s.file for s in result.shards],
    }
    if model_file:
        manifest["model_file"] = model_file
    manifest["shards"] = [s.as_dict() for s in result.shards]
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def sharding_metadata(result: ShardResult, source_dir: ModelDir) -> dict[str, Any]:
    """What metadata.json says beside the provenance: the shards, and the source's quantization."""
    metadata: dict[str, Any] = {
        "sharding": {"manifest": MANIFEST_FILE, "weight_format": result.weight_format, "strategy": result.strategy,
                     "shards": len(result.shards), "total_bytes": result.total_bytes},
    }
    quantization = (source_dir.metadata or {}).get("quantization")
    if isinstance(quantization, dict):  # a sharded quantized model is still that quantized model
        metadata["quantization"] = quantization
    return metadata


def sharding_info(result: ShardResult, model_file: dict[str, Any] | None) -> str:
    """SHARDING_INFO.md: what a person opening the directory needs to know."""
    lines = [
        "# Sharded model",
        "",
        f"Written by orion {__version__} on {utc_now()} from `{result.source['path']}`"
        + (f" (registry key `{result.source['key']}`)" if result.source.get("key") else "") + ".",
        f"Source weights sha256: `{result.source['sha256']}`.",
        "",
        f"{len(result.shards)} {result.weight_format} shards, {format_size(result.total_bytes)} in all, "
        f"{result.tensor_count} tensors in execution order ("
        + (f"{result.strategy['shards']} shards balanced by bytes" if "shards" in result.strategy
           else f"at most {format_size(result.strategy['max_shard_size'])} per shard") + ").",
        "",
        "| shard | size | tensors | layers | contains | sha256 |",
        "|---|---:|---:|---|---|---|",
    ]
    for shard in result.shards:
        layers = f"{shard.layers[0]}–{shard.layers[1]}" if shard.layers else "–"
        lines.append(f"| `{shard.file}` | {format_size(shard.bytes)} | {len(shard.tensors)} | {layers} | "
                     f"{', '.join(shard.contains)} | `{shard.sha256[:16]}…` |")
    if result.tied_dropped:
        lines += ["", f"Tied weights stored once: {', '.join(result.tied_dropped)} is re-tied to the input "
                      "embeddings on load, as transformers does."]
    for warning in result.warnings:
        lines += ["", f"Warning: {warning}."]
    lines += ["", "## Loading", ""]
    if result.weight_format == "onnx":
        lines += [
            f"`{model_file['file']}` refers to the shards as its external data; onnxruntime loads it as is:",
            "",
            "```python",
            "import onnxruntime",
            f"session = onnxruntime.InferenceSession('{result.output.name}/{model_file['file']}')",
            "```",
        ]
    else:
        lines += [
            "transformers reads `model.safetensors.index.json`:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            f"model = AutoModelForCausalLM.from_pretrained('{result.output.name}')",
            "```",
        ]
    lines += [
        "",
        "Shard by shard, in `loading_order` of `shard_manifest.json`, each verified against its sha256:",
        "",
        "```python",
        "from orion_cli.shard import iter_shards",
        f"for shard, tensors in iter_shards('{result.output.name}'):",
        "    ...  # shard.file, shard.layers; tensors: name -> tensor",
        "```",
        "",
        f"Check every file against the manifest: `orion shard --verify {result.output.name}`.",
        "",
    ]
    return "\n".join(lines)
