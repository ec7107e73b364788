"""What a model directory holds: its config, weight format, manifests and files.

Every command that takes a model directory starts here, so "a directory
without config.json or weights" is reported the same way everywhere.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from .errors import ModelDirError

WeightFormat = Literal["safetensors", "pytorch", "onnx"]

CONFIG_FILE = "config.json"
MANIFEST_FILE = "shard_manifest.json"
METADATA_FILE = "metadata.json"
# Files a model needs beside its weights; copied from input to output by every producing command.
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
# Where a producing command puts the model inside its output, if not at the top
# (orion quantize writes OUT/quantized and OUT/metadata.json).
MODEL_SUBDIRS = ("quantized", "merged")


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the model directory, '/'-separated
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class ModelDir:
    path: Path  # the directory holding the weights
    root: Path  # the directory the user named (differs when the model is in a subdirectory)
    format: WeightFormat
    weight_files: list[Path]
    config: dict[str, Any] | None
    shard_manifest: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    onnx_files: list[Path] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        if not self.config:
            return None
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    @property
    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    def support_files(self) -> list[Path]:
        return [self.path / name for name in SUPPORT_FILES if (self.path / name).is_file()]

    def check_weights(self) -> "ModelDir":
        """Raise ModelDirError naming the first weight file that is truncated, empty or not what it claims."""
        from .weights import check_weight_files

        check_weight_files(self.weight_files)
        return self


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path}: {what} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: {what} must hold a JSON object")
    return data


def _find_weights(path: Path) -> tuple[WeightFormat, list[Path], list[Path]] | None:
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return "safetensors", safetensors, []
    onnx = sorted(path.glob("*.onnx"))
    if onnx:
        data = sorted(p for p in path.iterdir() if p.is_file() and _is_onnx_external_data(p))
        return "onnx", onnx + data, onnx
    pytorch = sorted(path.glob("pytorch_model*.bin"))
    if pytorch:
        return "pytorch", pytorch, []
    return None


def _is_onnx_external_data(path: Path) -> bool:
    name = path.name
    return name.endswith((".onnx_data", ".onnx.data")) or (name.endswith(".data") and "onnx" in name)


def inspect_model_dir(path: str | Path, flag: str = "--model", require_config: bool = True) -> ModelDir:
    """Describe a model directory, or raise ModelDirError naming what is missing."""
    root = Path(path)
    if not root.exists():
        raise ModelDirError(f"{flag} {root}: no such directory")
    if not root.is_dir():
        raise ModelDirError(f"{flag} {root}: not a directory")

    model_path = root
    found = _find_weights(root)
    if found is None:
        for sub in MODEL_SUBDIRS:
            if (root / sub).is_dir() and (found := _find_weights(root / sub)):
                model_path = root / sub
                break
    if found is None:
        raise ModelDirError(
            f"{flag} {root}: no weights found (expected *.safetensors, *.onnx or pytorch_model.bin)"
        )
    weight_format, weights, onnx_files = found

    config_path = model_path / CONFIG_FILE
    config = _read_json(config_path, CONFIG_FILE) if config_path.is_file() else None
    if config is None and require_config:
        raise ModelDirError(f"{flag} {root}: no {CONFIG_FILE}; is this a Hugging Face model directory?")

    manifest_path = model_path / MANIFEST_FILE
    manifest = _read_json(manifest_path, MANIFEST_FILE) if manifest_path.is_file() else None
    metadata = None
    for candidate in (model_path / METADATA_FILE, root / METADATA_FILE):
        if candidate.is_file():
            metadata = _read_json(candidate, METADATA_FILE)
            break
    return ModelDir(
        path=model_path,
        root=root,
        format=weight_format,
        weight_files=weights,
        config=config,
        shard_manifest=manifest,
        metadata=metadata,
        onnx_files=onnx_files,
    )


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def list_files(root: Path) -> list[Path]:
    """Regular files under root, skipping hidden names and orion's temporary files, sorted."""
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def hash_files(root: Path, files: Iterable[Path] | None = None) -> list[FileRecord]:
    root = Path(root)
    paths = list_files(root) if files is None else sorted(files)
    return [
        FileRecord(path=p.relative_to(root).as_posix(), bytes=p.stat().st_size, sha256=sha256_file(p))
        for p in paths
    ]


def digest_records(records: Iterable[FileRecord]) -> str:
    """One sha256 naming a set of files: the hash of their sorted 'sha256  path' lines."""
    lines = "".join(f"{r.sha256}  {r.path}\n" for r in sorted(records, key=lambda r: r.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def weights_digest(model: ModelDir) -> tuple[str, list[FileRecord]]:
    """sha256 of a model's weight files (what provenance records for a source model)."""
    records = hash_files(model.path, model.weight_files)
    return digest_records(records), records


def copy_support_files(source: Path, destination: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy config, generation config and tokenizer files (except those named in skip); return the names copied."""
    copied = []
    skip = set(skip)
    for name in SUPPORT_FILES:
        if name not in skip and (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied
