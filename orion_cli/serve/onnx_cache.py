"""`--engine onnxruntime` on a checkpoint: its fp32 ONNX export, made once and kept in orion's cache.

llama.cpp serves a checkpoint after its conversion to GGUF; vLLM keeps its
compiled graphs in ~/.cache/vllm. orion exports the checkpoint with
quantize's exporter (the weightless graph, then every weight in fp32,
onnx_export/float_model.py) into CACHE/onnx/NAME-KEY, where CACHE is the
config's cache_dir (default $XDG_CACHE_HOME/orion). KEY covers what the
export depends on: config.json, each weight file's name, size and
modification time, and the versions of orion, torch, transformers and
optimum; a checkpoint changed in place gets a new export, and nothing is
ever evicted (delete CACHE/onnx to reclaim the space). The export is built
in a temporary sibling and renamed into place, so a server stopped halfway
leaves nothing, and two servers starting together each export and the
first to finish wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from .. import __version__
from ..atomic import atomic_output_dir, atomic_write_text
from ..checkpoint import CheckpointReader
from ..errors import OrionError, OutputExistsError
from ..modeldir import CONFIG_FILE, ModelDir, inspect_model_dir
from ..progress import NULL_PROGRESS, ProgressReporter

log = logging.getLogger("orion_cli.serve")

EXPORT_SUBDIR = "onnx"
RECORD_FILE = "orion-export.json"  # written last: what was exported, from where, by which versions
FLAG = "cache_dir"  # the config key naming the cache, for messages about it
_LIBRARIES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx")


class CacheSpaceError(OrionError):
    """The cache's filesystem cannot hold the export."""


def export_key(model: ModelDir) -> str:
    """A digest of what the export depends on, without reading the weights' bytes."""
    files = sorted(model.weight_files)
    facts = {
        "config": hashlib.sha256((model.path / CONFIG_FILE).read_bytes()).hexdigest(),
        "weights": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "versions": {"orion": __version__, **{name: _version(name) for name in _LIBRARIES}},
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def fp32_bytes(model: ModelDir) -> int:
    """The export's external data, about: every checkpoint tensor in fp32."""
    with CheckpointReader(model.path, "MODEL_DIR") as reader:
        return sum(4 * int(np.prod(reader.get_slice(name).get_shape(), dtype=np.int64)) for name in reader.names())


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse before writing when the filesystem of `directory` (or its nearest existing parent) lacks room."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise CacheSpaceError(f"{FLAG} {directory}: {what} needs {needed / 2**30:.1f} GiB and {existing} has "
                              f"{free / 2**30:.1f} GiB free (set cache_dir in --config to a larger disk)")


def float_model_for(model: ModelDir, cache_root: Path, progress: ProgressReporter = NULL_PROGRESS) -> ModelDir:
    """The fp32 ONNX export of checkpoint `model` in `cache_root`, exported now unless already there."""
    from ..onnx_export.float_model import export_float_model

    key = export_key(model)
    target = Path(cache_root).expanduser() / EXPORT_SUBDIR / f"{model.path.resolve().name}-{key[:16]}"
    if (target / RECORD_FILE).is_file():
        log.info("onnxruntime engine: serving the fp32 ONNX export in %s", target)
        return inspect_model_dir(target, FLAG)
    needed = fp32_bytes(model)
    check_free_space(target.parent, needed + needed // 20, f"the fp32 ONNX export of {model.root}")
    log.info("onnxruntime engine: exporting %s to fp32 ONNX in %s, once (%.1f GiB); later starts reuse it",
             model.root, target, needed / 2**30)
    try:
        # a directory there without the record is no export of ours: replaced
        with atomic_output_dir(target, force=target.exists(), flag=FLAG) as tmp, \
                progress.stage(f"Exporting {model.root} to fp32 ONNX for onnxruntime (once, cached)"):
            export_float_model(model.path, tmp, flag="MODEL_DIR")
            record = {"source": str(model.path.resolve()), "key": key, "orion_version": __version__,
                      "versions": {name: _version(name) for name in _LIBRARIES}}
            atomic_write_text(tmp / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    except OutputExistsError:
        if not (target / RECORD_FILE).is_file():
            raise
        log.info("onnxruntime engine: another process exported %s first; using its export", model.root)
    return inspect_model_dir(target, FLAG)


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
