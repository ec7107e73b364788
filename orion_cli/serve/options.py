"""What `orion serve` is asked to do, checked before any worker starts.

ServeOptions are the plain arguments of the library call. check_options()
turns them into a WorkerSpec (everything each rank needs, passed to the
workers through the environment as JSON) or raises one OrionError naming the
flag at fault: a missing model, a --tp that does not divide the heads, a
--pp-split that does not add up, a backend the machine cannot run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelDirError, UsageError
from ..modeldir import ModelDir, inspect_model_dir
from ..registry import Registry, resolve_model_ref

SPEC_ENV = "ORION_WORKER_SPEC"
NODE_RANK_ENV = "ORION_WORKER_NODE_RANK"
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ServeOptions:
    model: str  # a model directory or a registry key
    registry: str | Path = "models.json"
    tp: int = 1
    pp: int = 1
    pp_split: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    backend: str = "auto"
    activation_codec: str = "raw"
    # the codec's `auto` policy on the stage links (configs' `codec:` section): tensors under
    # codec_threshold_bytes go raw, the rest with activation_codec
    codec_threshold_bytes: int = 1024
    codec_int8_block_size: int = 32
    codec_zstd_level: int = 1
    max_batch_size: int = 8
    max_model_len: int = 2048
    dtype: str = "float32"
    max_restarts: int = 0
    drain_timeout: float = 30.0
    verbose: bool = False


@dataclass
class WorkerSpec:
    """Everything a rank needs; identical on every node except paths."""

    model_dir: str
    model_id: str
    registry_entry: dict[str, Any] | None
    architecture: str
    tp: int
    pp: int
    layer_counts: list[int]
    nnodes: int
    backend: str
    activation_codec: str
    codec_policy: dict[str, int]
    max_batch_size: int
    max_model_len: int
    dtype: str
    api_key: str | None
    host: str
    port: int
    drain_timeout: float
    verbose: bool
    config_digest: str
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "WorkerSpec":
        return cls(**json.loads(os.environ[SPEC_ENV]))

    def agreement_key(self) -> dict[str, Any]:
        """What every node must have been started with alike."""
        return {
            "--tp": self.tp, "--pp": self.pp, "--pp-split": self.layer_counts, "--nnodes": self.nnodes,
            "--backend": self.backend, "--activation-codec": self.activation_codec, "codec settings": self.codec_policy,
            "--max-batch-size": self.max_batch_size, "--max-model-len": self.max_model_len, "--dtype": self.dtype,
            "model config.json": self.config_digest,
        }


def resolve_model(options: ServeOptions) -> tuple[ModelDir, str, dict[str, Any] | None]:
    """The model directory, the id it is served under, and its registry entry when given a key."""
    path, key = resolve_model_ref(options.model, options.registry, flag="MODEL_DIR")
    model = inspect_model_dir(path, flag="MODEL_DIR").check_weights()
    entry = Registry(options.registry).get(key) if key else None
    if entry is not None:  # what /v1/models shows; the per-file hashes stay in the registry
        entry = {k: v for k, v in entry.items() if k not in ("files", "provenance")}
    model_id = key or Path(options.model).expanduser().resolve().name
    return model, model_id, entry


def check_common(options: ServeOptions) -> None:
    if options.dtype not in DTYPES:
        raise UsageError(f"--dtype {options.dtype}: choose one of {', '.join(DTYPES)}")
    from ..codec import LINK_CODECS

    if options.activation_codec not in LINK_CODECS:
        raise UsageError(f"--activation-codec {options.activation_codec}: choose one of {', '.join(LINK_CODECS)}")
    if options.backend not in ("auto", "nccl", "gloo"):
        raise UsageError(f"--backend {options.backend}: choose auto, nccl or gloo")
    for flag, value, low in (("--tp", options.tp, 1), ("--pp", options.pp, 1), ("--nnodes", options.nnodes, 1),
                             ("--max-batch-size", options.max_batch_size, 1),
                             ("--max-model-len", options.max_model_len, 1), ("--max-restarts", options.max_restarts, 0),
                             ("--node-rank", options.node_rank, 0), ("--port", options.port, 0),
                             ("--master-port", options.master_port, 1)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")
    for flag, value in (("--port", options.port), ("--master-port", options.master_port)):
        if value > 65535:
            raise UsageError(f"{flag} {value}: a TCP port is at most 65535")
    if options.node_rank >= options.nnodes:
        raise UsageError(f"--node-rank {options.node_rank}: must be below --nnodes {options.nnodes}")
    if options.drain_timeout <= 0:
        raise UsageError(f"--drain-timeout {options.drain_timeout}: must be positive")


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


def check_torch_options(options: ServeOptions, model: ModelDir, model_id: str,
                        entry: dict[str, Any] | None) -> WorkerSpec:
    """Everything about a safetensors/.bin model that can be checked without starting a worker."""
    from transformers import AutoConfig, AutoTokenizer

    from .architectures import check_tensor_parallel, model_shape, split_layers

    check_common(options)
    if model.format == "onnx":
        raise UsageError("internal: ONNX models are served by onnx_engine")
    try:
        hf_config = AutoConfig.from_pretrained(model.path)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"MODEL_DIR {model.root}: config.json cannot be read by transformers ({exc})") from None
    shape = model_shape(hf_config)
    check_tensor_parallel(shape, options.tp)
    layers = split_layers(shape.num_layers, options.pp, options.pp_split)
    world = options.tp * options.pp
    if world % options.nnodes:
        raise UsageError(f"--nnodes {options.nnodes}: must divide the {world} ranks (--tp {options.tp} x --pp {options.pp})")
    backend = resolve_backend(options.backend, world // options.nnodes)
    try:
        AutoTokenizer.from_pretrained(model.path)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelDirError(f"MODEL_DIR {model.root}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
    notes = []
    max_model_len = options.max_model_len
    if max_model_len > shape.max_positions:
        notes.append(f"--max-model-len {max_model_len} exceeds the model's {shape.max_positions} positions; "
                     f"using {shape.max_positions}")
        max_model_len = shape.max_positions
    config_bytes = (model.path / "config.json").read_bytes()
    return WorkerSpec(
        model_dir=str(model.path.resolve()), model_id=model_id, registry_entry=entry,
        architecture=model.architecture or shape.model_type, tp=options.tp, pp=options.pp,
        layer_counts=[len(r) for r in layers], nnodes=options.nnodes, backend=backend,
        activation_codec=options.activation_codec,
        codec_policy={"threshold_bytes": options.codec_threshold_bytes,
                      "int8_block_size": options.codec_int8_block_size, "zstd_level": options.codec_zstd_level},
        max_batch_size=options.max_batch_size,
        max_model_len=max_model_len, dtype=options.dtype, api_key=options.api_key, host=options.host,
        port=options.port, drain_timeout=options.drain_timeout, verbose=options.verbose,
        config_digest=hashlib.sha256(config_bytes).hexdigest()[:16], notes=notes,
    )
