"""Reading a sharded directory back: the manifest, verification, progressive loading.

`iter_shards` hands a consumer one shard at a time, in the manifest's loading
order, each checked against its recorded size and sha256 before its tensors are
returned, so a server can start on the embeddings and first layers while later
shards are still being read. `verify_sharded_dir` checks every file at once
(what `orion shard --verify` runs).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ModelDirError, UnsupportedModelError, VerificationError
from ..modeldir import MANIFEST_FILE, sha256_file
from ..progress import NULL_PROGRESS, ProgressReporter

MANIFEST_FORMAT = "orion-shard"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    index: int
    file: str
    path: Path
    bytes: int
    sha256: str
    tensors: tuple[str, ...]
    layers: tuple[int, int] | None  # first and last decoder layer with tensors here
    contains: tuple[str, ...]  # of "embeddings", "layers", "final", "head"


@dataclass
class ShardManifest:
    directory: Path
    document: dict[str, Any]
    shards: list[ShardInfo]  # in loading order

    @property
    def weight_format(self) -> str:
        return self.document.get("weight_format", "safetensors")

    @property
    def model_file(self) -> dict[str, Any] | None:
        return self.document.get("model_file")


@dataclass
class VerifyResult:
    directory: Path
    files: list[str]
    bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "valid": True, "files": self.files, "bytes": self.bytes,
                "seconds": round(self.seconds, 3)}


def read_manifest(directory: str | Path, flag: str = "--verify") -> ShardManifest:
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"{flag} {directory}: no such directory")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ModelDirError(f"{flag} {directory}: no {MANIFEST_FILE}; was it written by orion shard?")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, not {MANIFEST_FORMAT!r}")
        version = document.get("format_version")
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise UnsupportedModelError(
                f"{path}: manifest format_version {version!r}; this orion reads up to {MANIFEST_VERSION}"
            )
        entries = {entry["file"]: entry for entry in document["shards"]}
        order = document.get("loading_order") or list(entries)
        shards = [_shard_info(directory, entries[file]) for file in order]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelDirError(f"{path}: not a valid shard manifest ({reason})") from None
    return ShardManifest(directory, document, shards)


def _shard_info(directory: Path, entry: dict[str, Any]) -> ShardInfo:
    file = entry["file"]
    if Path(file).name != file:  # a manifest must not point outside its directory
        raise ValueError(f"shard file {file!r} is not a plain file name")
    layers = entry.get("layers")
    return ShardInfo(
        index=int(entry.get("index", 0)), file=file, path=directory / file, bytes=int(entry["bytes"]),
        sha256=str(entry["sha256"]), tensors=tuple(entry.get("tensors", ())),
        layers=(int(layers["first"]), int(layers["last"])) if layers else None,
        contains=tuple(entry.get("contains", ())),
    )


def check_file(path: Path, expected_bytes: int, expected_sha256: str) -> str | None:
    """What is wrong with `path` against its manifest record, or None."""
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST_FILE})"
    size = path.stat().st_size
    if size != expected_bytes:
        hint = "truncated" if size < expected_bytes else "longer than recorded"
        return f"{path}: {size} bytes where {MANIFEST_FILE} records {expected_bytes} ({hint})"
    if sha256_file(path) != expected_sha256:
        return f"{path}: sha256 does not match {MANIFEST_FILE}; the file is corrupted"
    return None


def _manifest_files(manifest: ShardManifest) -> list[tuple[Path, int, str]]:
    files = [(s.path, s.bytes, s.sha256) for s in manifest.shards]
    if manifest.model_file:
        record = manifest.model_file
        files.insert(0, (manifest.directory / record["file"], int(record["bytes"]), str(record["sha256"])))
    return files


def verify_sharded_dir(directory: str | Path, progress: ProgressReporter = NULL_PROGRESS) -> VerifyResult:
    """Re-hash every file the manifest lists; raise VerificationError naming the first bad one."""
    started = time.perf_counter()
    manifest = read_manifest(directory)
    files = _manifest_files(manifest)
    total = sum(size for _, size, _ in files)
    with progress.stage(f"Verifying {len(files)} files", total=total) as advance:

        def check(record: tuple[Path, int, str]) -> str | None:
            problem = check_file(*record)
            advance(record[1])
            return problem

        with ThreadPoolExecutor(max_workers=_hash_threads(len(files))) as pool:
            problems = [p for p in pool.map(check, files) if p]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise VerificationError(problems[0] + more)
    return VerifyResult(manifest.directory, [path.name for path, _, _ in files], total, time.perf_counter() - started)


def _hash_threads(count: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(count, cores, 4))


def iter_shards(
    directory: str | Path,
    verify: bool = True,
    progress: ProgressReporter = NULL_PROGRESS,
    framework: str = "pt",
) -> Iterator[tuple[ShardInfo, dict[str, Any]]]:
    """Yield (shard, {name: tensor}) in loading order, each shard verified before it is read.

    Safetensors shards give torch tensors (framework="pt") or numpy arrays
    (framework="numpy"); ONNX shards give numpy arrays. A shard that is missing,
    truncated or does not match its sha256 raises VerificationError naming it,
    after the shards before it were handed out.
    """
    manifest = read_manifest(directory, flag="directory")
    onnx_layout = None
    if manifest.weight_format == "onnx":
        from .onnx import tensor_layout

        model_path, size, digest = _manifest_files(manifest)[0]
        if verify and (problem := check_file(model_path, size, digest)):
            raise VerificationError(problem)
        onnx_layout = tensor_layout(model_path)
    total = sum(s.bytes for s in manifest.shards)
    with progress.stage(f"Loading {len(manifest.shards)} shards", total=total) as advance:
        for shard in manifest.shards:
            if verify and (problem := check_file(shard.path, shard.bytes, shard.sha256)):
                raise VerificationError(problem)
            if onnx_layout is not None:
                tensors = _read_onnx_shard(shard.path, onnx_layout.get(shard.file, []))
            else:
                tensors = _read_safetensors_shard(shard.path, framework)
            advance(shard.bytes)
            yield shard, tensors


def _read_safetensors_shard(path: Path, framework: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework=framework, device="cpu") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _read_onnx_shard(path: Path, entries: list[tuple[str, str, tuple[int, ...], int, int]]) -> dict[str, Any]:
    """numpy arrays of one ONNX data shard (4-bit types come back packed, as uint8)."""
    import numpy as np
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    data = path.read_bytes()
    tensors = {}
    for name, dtype, shape, offset, length in entries:
        raw = np.frombuffer(data, dtype=np.uint8, count=length, offset=offset)
        np_dtype = np.dtype(tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, dtype)))
        if np_dtype.itemsize * int(np.prod(shape, dtype=np.int64)) == length:
            tensors[name] = raw.view(np_dtype).reshape(shape)
        else:
            tensors[name] = raw
    return tensors
