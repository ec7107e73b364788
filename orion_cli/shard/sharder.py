"""orion shard: split a checkpoint into shards in execution order, with a manifest.

Inputs: a single model.safetensors, a sharded safetensors checkpoint (Hugging
Face or orion), pytorch_model*.bin (read with torch.load(weights_only=True)), or
an ONNX model with external data (what `orion quantize` writes). Outputs:
shard_NN.safetensors (or shard_NN.onnx_data beside a rewritten model.onnx),
shard_manifest.json, the Hugging Face index, SHARDING_INFO.md and metadata.json.

Safetensors tensors are copied as raw byte ranges located through the source
headers, never deserialized: dtypes survive bit for bit and memory stays at one
copy buffer per writer thread, whatever the model's size.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import CheckpointReader
from ..config import ShardSettings, override, shipped_config
from ..errors import ModelDirError, UnsupportedModelError, UsageError
from ..modeldir import copy_support_files, sha256_file
from ..producing import Output, producing, resolve_source
from ..progress import NULL_PROGRESS, ProgressReporter
from ..sizes import format_size, parse_size
from ..weights import check_safetensors_file, read_safetensors_header
from .io import SourceTensor, same_bytes, write_shards
from .outputs import (INFO_FILE, ShardRecord, ShardResult, sharding_info, sharding_metadata, write_hf_index,
                      write_manifest)
from .plan import (
    GROUP_EMBEDDINGS, GROUP_HEAD, GROUP_NAMES, execution_order, layer_index, split_by_limit, split_into, tensor_group,
)

log = logging.getLogger(__name__)

ONNX_MODEL_FILE = "model.onnx"
_MAX_OFFSET = 2**64 - 1  # the widest data offset a safetensors header can hold
_TORCH_DTYPES = {  # torch dtype name -> safetensors dtype name
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}


@dataclass
class _PlannedShard:
    file: str
    tensors: list[SourceTensor]
    prefix: bytes  # the safetensors header, or nothing for ONNX data


def shard_model(
    model: str | Path,
    output: str | Path | Output | None = None,
    *,
    settings: ShardSettings | None = None,
    progress: ProgressReporter = NULL_PROGRESS,
    **overrides: Any,
) -> ShardResult:
    """Shard `model` (a directory or registry key) into `output` (a path or an Output) by count or by size
    (settings.shards or settings.max_shard_size, also given as keyword overrides: shards=4)."""
    started = time.perf_counter()
    settings = override(settings or shipped_config().shard, **overrides)
    output = Output.of(output).resolved()
    limit = _check_strategy(settings.shards, settings.max_shard_size)
    source = resolve_source("--model", model, output.registry)
    source_dir = source.model

    warnings: list[str] = []
    tied_dropped: list[str] = []
    onnx_source = None
    reader = None
    if source_dir.format == "onnx":
        from .onnx import read_onnx_source

        onnx_source = read_onnx_source(source_dir)
        tensors, metadata = onnx_source.tensors, {}
        if not tensors:
            raise ModelDirError(f"--model {model}: {onnx_source.model_file.name} has no weights stored outside the graph to shard")
    else:
        reader = CheckpointReader(source_dir.path)
        tensors, metadata = _checkpoint_tensors(reader, source_dir.format)
        tensors = _in_execution_order(tensors)
        tensors, tied_dropped = _drop_tied_head(tensors, source_dir.config or {})
    if not tensors:
        raise ModelDirError(f"--model {model}: the checkpoint holds no tensors")
    strategy = {"shards": settings.shards} if settings.shards is not None else {"max_shard_size": limit}
    plan = _plan(tensors, settings.shards, limit, source_dir.format, metadata, warnings)
    weight_format = "onnx" if onnx_source else "safetensors"

    try:
        with producing("shard", [source], output, default_name=f"{source_dir.root.absolute().name}-sharded",
                       parameters=settings.model_dump(), progress=progress) as out:
            tmp = out.tmp
            records = _write_shards(tmp, plan, progress)
            model_file = None
            if onnx_source is not None:
                placements = _onnx_placements(plan)
                onnx_source.write_model(tmp / ONNX_MODEL_FILE, placements)
                model_file = {"file": ONNX_MODEL_FILE, "bytes": (tmp / ONNX_MODEL_FILE).stat().st_size,
                              "sha256": sha256_file(tmp / ONNX_MODEL_FILE)}
            else:
                write_hf_index(tmp, {t.name: s.file for s in plan for t in s.tensors}, sum(t.nbytes for t in tensors))
            copy_support_files(source_dir.path, tmp)
            result = ShardResult(
                output=out.output, weight_format=weight_format, strategy=strategy, source=out.source_records()[0],
                shards=records, tensor_count=len(tensors), tied_dropped=tied_dropped, warnings=warnings,
            )
            write_manifest(tmp, result, model_file, tensors)
            out.metadata.update(sharding_metadata(result, source_dir))
            (tmp / INFO_FILE).write_text(sharding_info(result, model_file), encoding="utf-8")
    finally:
        if reader is not None:
            reader.close()
    result.registered = out.registered
    result.seconds = time.perf_counter() - started
    return result


def _check_strategy(shards: int | None, max_shard_size: str | int | None) -> int | None:
    if shards is not None and max_shard_size is not None:
        raise UsageError("--shards and --max-shard-size exclude each other; give one of them")
    if shards is None and max_shard_size is None:
        raise UsageError("give --shards N or --max-shard-size SIZE (or set shard.shards or shard.max_shard_size in the config)")
    if shards is not None and shards < 1:
        raise UsageError(f"--shards {shards}: must be at least 1")
    return parse_size(max_shard_size, "--max-shard-size") if max_shard_size is not None else None


# -- reading the source -------------------------------------------------------


def _checkpoint_tensors(reader: CheckpointReader, weight_format: str) -> tuple[list[SourceTensor], dict[str, str]]:
    """Every tensor of a safetensors or .bin checkpoint, in stored order, and the header metadata."""
    if weight_format == "safetensors":
        metadata: dict[str, str] = {}
        for file in reader.files:
            metadata.update(read_safetensors_header(file)[1])
            check_safetensors_file(file)
        tensors = []
        for name in reader.names():
            info = reader.info(name)
            tensors.append(SourceTensor(name, info.dtype, info.shape, info.nbytes, layer_index(name),
                                        tensor_group(name), file=info.file, start=info.start))
        return tensors, metadata
    return [_bin_tensor(reader, name) for name in reader.names()], {}


def _bin_tensor(reader: CheckpointReader, name: str) -> SourceTensor:
    import torch

    tensor = reader.get_tensor(name)
    if not isinstance(tensor, torch.Tensor) or tensor.is_sparse or tensor.is_complex():
        raise UnsupportedModelError(f"{reader.file_of(name)}: entry {name} is not a dense real tensor")
    dtype = _TORCH_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
    if dtype is None:
        raise UnsupportedModelError(f"{reader.file_of(name)}: tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")

    def load() -> memoryview:
        data = reader.get_tensor(name).detach().contiguous().reshape(-1)
        return memoryview(data.view(torch.uint8).numpy())

    nbytes = tensor.numel() * tensor.element_size()
    return SourceTensor(name, dtype, tuple(tensor.shape), nbytes, layer_index(name), tensor_group(name), load=load)


def _in_execution_order(tensors: list[SourceTensor]) -> list[SourceTensor]:
    by_name = {t.name: t for t in tensors}
    return [by_name[name] for name in execution_order(list(by_name))]


def _drop_tied_head(tensors: list[SourceTensor], config: dict[str, Any]) -> tuple[list[SourceTensor], list[str]]:
    """Leave out an output head that repeats the input embeddings when the config ties them.

    transformers re-ties such a head on load and its own save_pretrained never
    stores it; a config.json without the key ties them (transformers' default).
    """
    if not config.get("tie_word_embeddings", True):
        return tensors, []
    embeddings = [t for t in tensors if t.group == GROUP_EMBEDDINGS]
    dropped = [
        head.name for head in tensors
        if head.group == GROUP_HEAD and any(same_bytes(head, embedding) for embedding in embeddings)
    ]
    return [t for t in tensors if t.name not in dropped], dropped


# -- planning -----------------------------------------------------------------


def _plan(
    tensors: list[SourceTensor], count: int | None, limit: int | None, weight_format: str,
    metadata: dict[str, str], warnings: list[str],
) -> list[_PlannedShard]:
    if count is not None and count > len(tensors):
        raise UsageError(f"--shards {count}: the model has only {len(tensors)} tensors to place; use at most {len(tensors)}")
    onnx = weight_format == "onnx"
    header_metadata = {"format": "pt"} | metadata if not onnx else {}
    if count is not None:
        runs = split_into([t.nbytes for t in tensors], count)
    else:
        assert limit is not None
        costs = [t.nbytes + (0 if onnx else _header_entry_bound(t)) for t in tensors]
        fixed = 0 if onnx else 8 + len(_compact_json({"__metadata__": header_metadata})) + 7
        split = split_by_limit(costs, limit, fixed)
        runs = split.runs
        for index in split.oversized:
            tensor = tensors[index]
            message = (f"tensor {tensor.name} ({format_size(tensor.nbytes)}) is larger than --max-shard-size "
                       f"{format_size(limit)}; it gets a shard of its own")
            warnings.append(message)
            log.warning(message)
    width = max(2, len(str(len(runs) - 1)))
    suffix = ".onnx_data" if onnx else ".safetensors"
    planned = []
    for index, run in enumerate(runs):
        members = [tensors[i] for i in run]
        prefix = b"" if onnx else safetensors_header(members, header_metadata)
        planned.append(_PlannedShard(f"shard_{index:0{width}d}{suffix}", members, prefix))
    return planned


def safetensors_header(tensors: Sequence[SourceTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `tensors` back to back.

    The header is padded with spaces to a multiple of 8 bytes, as safetensors
    itself writes it, so the data that follows starts aligned.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = _compact_json(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _header_entry_bound(tensor: SourceTensor) -> int:
    """Bytes a tensor's entry can take in a safetensors header, whatever its offsets."""
    entry = {tensor.name: {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [_MAX_OFFSET] * 2}}
    return len(_compact_json(entry)) - 1  # the braces of a one-entry object stand in for a separating comma


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


# -- writing ------------------------------------------------------------------


def _writer_threads(shard_count: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(shard_count, cores, 4))


def _write_shards(directory: Path, plan: list[_PlannedShard], progress: ProgressReporter) -> list[ShardRecord]:
    """Write every shard, in parallel, sha256 computed as bytes go by."""
    total = sum(len(s.prefix) + sum(t.nbytes for t in s.tensors) for s in plan)
    jobs = [(directory / s.file, s.prefix, s.tensors) for s in plan]
    with progress.stage(f"Writing {len(plan)} shards ({format_size(total)})", total=total) as advance:
        written = write_shards(jobs, advance, threads=_writer_threads(len(plan)))
    records = []
    for index, (shard, (size, digest)) in enumerate(zip(plan, written, strict=True)):
        layers = [t.layer for t in shard.tensors if t.layer is not None]
        groups = sorted({t.group for t in shard.tensors})
        records.append(ShardRecord(
            index=index, file=shard.file, bytes=size, sha256=digest, tensors=[t.name for t in shard.tensors],
            tensor_bytes=sum(t.nbytes for t in shard.tensors),
            layers=(min(layers), max(layers)) if layers else None, contains=[GROUP_NAMES[g] for g in groups],
        ))
    return records


def _onnx_placements(plan: list[_PlannedShard]) -> dict[str, tuple[str, int]]:
    placements = {}
    for shard in plan:
        offset = 0
        for tensor in shard.tensors:
            placements[tensor.name] = (shard.file, offset)
            offset += tensor.nbytes
    return placements
