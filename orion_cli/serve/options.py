"""What `orion serve` is asked to do, checked before any worker starts.

A ServeJob bundles the model reference with the config's ServeSettings and
CodecSettings. check_torch_options() turns it into a WorkerSpec (everything
each rank needs, passed to the workers through the environment as JSON) or
raises one OrionError naming the flag at fault: a missing model, a --tp that
does not divide the heads, a --pp-split that does not add up, a backend the
machine cannot run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..config import CodecSettings, ServeSettings
from ..errors import ModelDirError, OrionError, UsageError
from ..modeldir import ModelDir
from ..producing import resolve_source
from ..registry import Registry

SPEC_ENV = "ORION_WORKER_SPEC"
NODE_RANK_ENV = "ORION_WORKER_NODE_RANK"


class ServeError(OrionError):
    """A worker failed, the rendezvous did not complete, or the port could not be bound."""


@dataclass
class ServeSummary:
    model: str
    engine: str
    url: str | None
    nnodes: int
    node_rank: int
    tp: int
    pp: int
    requests: int = 0
    generated_tokens: int = 0
    restarts: int = 0
    stopped_by: str | None = None
    drained: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"event": "stopped", **asdict(self)}


@dataclass(frozen=True)
class ServeJob:
    model: str  # a model directory or a registry key
    registry: str | Path
    settings: ServeSettings
    codec: CodecSettings
    verbose: bool = False


@dataclass
class WorkerSpec:
    """Everything a rank needs; identical on every node except paths."""

    model_dir: str
    model_id: str
    registry_entry: dict[str, Any] | None
    architecture: str
    layer_counts: list[int]
    backend: str
    settings: dict[str, Any]  # ServeSettings, as JSON
    codec: dict[str, Any]  # CodecSettings, as JSON
    max_model_len: int  # the settings' value, capped by the model's positions
    verbose: bool
    config_digest: str
    port: int = 0  # the port the agent bound (the settings' may be 0)
    notes: list[str] = field(default_factory=list)

    @cached_property
    def serve(self) -> ServeSettings:
        return ServeSettings.model_validate(self.settings)

    @cached_property
    def codec_settings(self) -> CodecSettings:
        return CodecSettings.model_validate(self.codec)

    @property
    def world_size(self) -> int:
        return self.settings["tp"] * self.settings["pp"]

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "WorkerSpec":
        return cls(**json.loads(os.environ[SPEC_ENV]))

    def agreement_key(self) -> dict[str, Any]:
        """What every node must have been started with alike."""
        s = self.settings
        return {
            "--tp": s["tp"], "--pp": s["pp"], "--pp-split": self.layer_counts, "--nnodes": s["nnodes"],
            "--backend": self.backend, "--activation-codec": s["activation_codec"], "codec settings": self.codec,
            "--max-batch-size": s["max_batch_size"], "--max-model-len": self.max_model_len, "--dtype": s["dtype"],
            "model config.json": self.config_digest,
        }


def resolve_model(job: ServeJob) -> tuple[ModelDir, str, dict[str, Any] | None]:
    """The model directory, the id it is served under, and its registry entry when given a key."""
    source = resolve_source("MODEL_DIR", job.model, job.registry)
    entry = Registry(job.registry).get(source.key) if source.key else None
    if entry is not None:  # what /v1/models shows; the per-file hashes stay in the registry
        entry = {k: v for k, v in entry.items() if k not in ("files", "provenance")}
    model_id = source.key or Path(job.model).expanduser().resolve().name
    return source.model, model_id, entry


def check_common(settings: ServeSettings) -> None:
    """What the settings' own types cannot say: how they fit together."""
    if settings.node_rank >= settings.nnodes:
        raise UsageError(f"--node-rank {settings.node_rank}: must be below --nnodes {settings.nnodes}")


def resolve_backend(requested: str, nproc_per_node: int) -> str:
    import torch

    cuda = torch.cuda.is_available()
    backend = ("nccl" if cuda else "gloo") if requested == "auto" else requested
    if backend == "nccl":
        if not cuda:
            raise UsageError("--backend nccl: CUDA is not available on this machine; use --backend gloo")
        if torch.cuda.device_count() < nproc_per_node:
            raise UsageError(
                f"--tp/--pp: this node runs {nproc_per_node} ranks but has {torch.cuda.device_count()} CUDA devices"
            )
    return backend


def check_torch_options(job: ServeJob, model: ModelDir, model_id: str, entry: dict[str, Any] | None) -> WorkerSpec:
    """Everything about a safetensors/.bin model that can be checked without starting a worker."""
    from transformers import AutoConfig, AutoTokenizer

    from .architectures import check_tensor_parallel, model_shape, split_layers

    settings = job.settings
    try:
        hf_config = AutoConfig.from_pretrained(model.path)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"MODEL_DIR {model.root}: config.json cannot be read by transformers ({exc})") from None
    shape = model_shape(hf_config)
    check_tensor_parallel(shape, settings.tp)
    layers = split_layers(shape.num_layers, settings.pp, settings.pp_split)
    world = settings.tp * settings.pp
    if world % settings.nnodes:
        raise UsageError(f"--nnodes {settings.nnodes}: must divide the {world} ranks "
                         f"(--tp {settings.tp} x --pp {settings.pp})")
    backend = resolve_backend(settings.backend, world // settings.nnodes)
    try:
        AutoTokenizer.from_pretrained(model.path)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelDirError(f"MODEL_DIR {model.root}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
    notes = []
    max_model_len = settings.max_model_len
    if max_model_len > shape.max_positions:
        notes.append(f"--max-model-len {max_model_len} exceeds the model's {shape.max_positions} positions; "
                     f"using {shape.max_positions}")
        max_model_len = shape.max_positions
    config_bytes = (model.path / "config.json").read_bytes()
    return WorkerSpec(
        model_dir=str(model.path.resolve()), model_id=model_id, registry_entry=entry,
        architecture=model.architecture or shape.model_type, layer_counts=[len(r) for r in layers], backend=backend,
        settings=settings.model_dump(), codec=job.codec.model_dump(), max_model_len=max_model_len,
        verbose=job.verbose, config_digest=hashlib.sha256(config_bytes).hexdigest()[:16], port=settings.port,
        notes=notes,
    )
