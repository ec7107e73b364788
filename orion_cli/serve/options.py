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
import logging
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..config import CodecSettings, ServeSettings
from ..errors import ModelDirError, OrionError, UnsupportedModelError, UsageError
from ..modeldir import ModelDir
from ..producing import resolve_source
from ..registry import Registry

log = logging.getLogger(__name__)

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
    cache_dir: Path | None = None  # where --engine onnxruntime keeps a checkpoint's ONNX export (None: no export)


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
    onnx_file: str | None = None  # an orion quantize output: its graph, whose initializers are the weights
    quantization: dict[str, Any] | None = None  # its metadata.json "quantization" section

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


def choose_engine(settings: ServeSettings, model: ModelDir) -> str:
    """torch or onnxruntime, for --engine and the model's format.

    `auto` serves a checkpoint with torch (which splits it over ranks and runs on GPUs), except one whose
    transformers class takes no attention function, served in one process: that one gets its fp32 ONNX export
    on onnxruntime, which runs it, rather than a refusal."""
    if settings.engine != "auto":
        return settings.engine
    whole = settings.tp == settings.pp == settings.nnodes == 1
    if model.format != "onnx":
        if whole and (reason := torch_cannot_run(model, settings.trust_remote_code)):
            log.warning("%s; serving its fp32 ONNX export with onnxruntime instead", reason)
            return "onnxruntime"
        return "torch"
    return "onnxruntime" if whole else "torch"


def decoder_file(model: ModelDir) -> Path:
    """The decoder graph of an ONNX model directory: model.onnx, or its only graph."""
    names = [p.name for p in model.onnx_files]
    if "model.onnx" in names or len(names) == 1:
        return model.path / ("model.onnx" if "model.onnx" in names else names[0])
    raise ModelDirError(f"MODEL_DIR {model.root}: holds several ONNX graphs ({', '.join(names)}) and no "
                        "model.onnx; which one is the decoder?")


def check_torch_can_read(model: ModelDir, onnx_file: str) -> dict[str, int]:
    """The torch engine reads an ONNX model's weights by checkpoint name, as orion quantize names them; returns
    each quantized weight's block size."""
    from ..onnx_weights import OnnxWeights

    with OnnxWeights(onnx_file) as weights:
        if weights.foreign:
            raise UsageError(f"--engine torch: MODEL_DIR {model.root} was not quantized by orion quantize (its "
                             f"weight {weights.foreign[0]} is not named after a checkpoint tensor), so the torch "
                             "engine cannot place its weights; serve it whole with --engine onnxruntime")
        return weights.block_sizes()


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
    """Everything about a model the torch engine serves (safetensors, .bin, or an orion quantize output) that
    can be checked without starting a worker."""
    from transformers import AutoTokenizer

    from .plans import Shape, check_parallel, model_plan, split_layers

    settings = job.settings
    hf_config = load_config(model, settings.trust_remote_code)
    plan = model_plan(hf_config)
    check_parallel(hf_config, plan, settings.tp, settings.pp)
    shape = Shape.of(hf_config)
    onnx_file = quantization = None
    blocks: dict[str, int] = {}
    if model.format == "onnx":
        onnx_file = str(decoder_file(model).resolve())
        quantization = (model.metadata or {}).get("quantization")
        blocks = check_torch_can_read(model, onnx_file)
    if settings.tp > 1:
        check_planned_linears(hf_config, plan, settings.tp, shape, blocks)
    layers = split_layers(shape.num_layers, settings.pp, settings.pp_split)
    world = settings.tp * settings.pp
    if world % settings.nnodes:
        raise UsageError(f"--nnodes {settings.nnodes}: must divide the {world} ranks "
                         f"(--tp {settings.tp} x --pp {settings.pp})")
    backend = resolve_backend(settings.backend, world // settings.nnodes)
    try:
        AutoTokenizer.from_pretrained(model.path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelDirError(f"MODEL_DIR {model.root}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
    notes = []
    if backend == "gloo":
        dtype, why = cpu_dtype(settings.dtype, cpu_flags())
        if why:
            notes.append(why)
            settings = settings.model_copy(update={"dtype": dtype})
    if plan.source == "orion" and world > 1:
        notes.append(f"{hf_config.model_type}: transformers ships no parallel plan; using orion's")
    max_model_len = settings.max_model_len
    if max_model_len > shape.max_positions:
        notes.append(f"--max-model-len {max_model_len} exceeds the model's {shape.max_positions} positions; "
                     f"using {shape.max_positions}")
        max_model_len = shape.max_positions
    config_bytes = (model.path / "config.json").read_bytes()
    return WorkerSpec(
        model_dir=str(model.path.resolve()), model_id=model_id, registry_entry=entry,
        architecture=model.architecture or hf_config.model_type, layer_counts=[len(r) for r in layers],
        backend=backend, settings=settings.model_dump(), codec=job.codec.model_dump(), max_model_len=max_model_len,
        verbose=job.verbose, config_digest=hashlib.sha256(config_bytes).hexdigest()[:16], port=settings.port,
        notes=notes, onnx_file=onnx_file, quantization=quantization,
    )


# CPU instructions with native matrix arithmetic in each half-precision dtype (what oneDNN uses for torch's
# matmuls); without them torch converts to float32 and back around every product, slower than float32 itself
NATIVE_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_dtype(dtype: str, flags: set[str]) -> tuple[str, str | None]:
    """The dtype CPU ranks serve in, and why it is not the one asked for: float32 where the CPU has no native
    instructions for the half-precision dtype asked for (unknown flags: as asked)."""
    needed = NATIVE_CPU_FLAGS.get(dtype)
    if needed is None or not flags or flags & set(needed):
        return dtype, None
    names = " or ".join(flag.upper().replace("_", "-") for flag in needed)
    return "float32", (f"--dtype {dtype}: this CPU has no native {dtype} matrix instructions ({names}); "
                       "serving in float32, which is faster here")


def load_config(model: ModelDir, trust_remote_code: bool) -> Any:
    """The model's transformers config, refused (with the reason) when transformers has no causal-LM class for it
    or the torch engine cannot run that class."""
    config = _read_config(model, trust_remote_code)
    if reason := _attention_refusal(model, config):
        raise UnsupportedModelError(f"{reason}; serve it in one process with --engine onnxruntime")
    return config


def torch_cannot_run(model: ModelDir, trust_remote_code: bool) -> str | None:
    """Why the torch engine cannot run this checkpoint's architecture, where that is the trouble (StableLM, GPT-J:
    classes that take no attention function); any other fault of the config is load_config's to report."""
    try:
        return _attention_refusal(model, _read_config(model, trust_remote_code))
    except OrionError:
        return None


def _read_config(model: ModelDir, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UsageError(f"MODEL_DIR {model.root}: its config.json names custom modeling code (auto_map); "
                             "pass --trust-remote-code to run it") from None
        raise ModelDirError(f"MODEL_DIR {model.root}: config.json cannot be read by transformers "
                            f"({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise ModelDirError(f"MODEL_DIR {model.root}: config.json cannot be read by transformers ({exc})") from None
    if not _remote(config) and type(config) not in AutoModelForCausalLM._model_mapping:
        raise UnsupportedModelError(f"MODEL_DIR {model.root}: architecture {_architecture(config)} (model_type "
                                    f"{config.model_type!r}) has no causal-LM class in transformers, so orion serve "
                                    "cannot run it")
    return config


# Layer kinds whose whole state is the keys and values the torch engine's attention function caches, with a
# sliding window it applies. transformers also has "chunked_attention" (Llama 4: a mask the function does not
# build), "linear_attention" (MiniMax) and "conv" (LFM2), which keep state of their own.
CACHED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _attention_refusal(model: ModelDir, config: Any) -> str | None:
    from transformers import AutoModelForCausalLM

    if _remote(config):
        return None
    if not getattr(AutoModelForCausalLM._model_mapping[type(config)], "_supports_attention_backend", False):
        return (f"MODEL_DIR {model.root}: transformers' {_architecture(config)} picks its attention classes itself "
                "and takes no attention function, so the torch engine (whose KV cache is an attention function) "
                "cannot run it")
    text = config.get_text_config()
    others = sorted(set(getattr(text, "layer_types", None) or ()) - CACHED_LAYER_TYPES)
    if others:
        return (f"MODEL_DIR {model.root}: {_architecture(config)} has layers of type {others[0]!r} (config.json "
                "layer_types), whose state is not a key/value cache (linear attention, convolution), so the torch "
                "engine, which keeps only keys and values, cannot run it")
    return None


def _remote(config: Any) -> bool:
    return bool(getattr(config, "auto_map", None) and "AutoModelForCausalLM" in config.auto_map)


def _architecture(config: Any) -> str:
    return (getattr(config, "architectures", None) or [config.model_type])[0]


def check_planned_linears(config: Any, plan: Any, tp: int, shape: Any, blocks: dict[str, int] | None = None) -> None:
    """Every linear layer the tensor-parallel plan splits divides into whole shares (built on meta, no weights),
    and, for a block-quantized weight (`blocks`: inputs per block by checkpoint name), a row-parallel share is
    whole blocks."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .plans import check_split_features

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    prefix, base = next((name, child) for name, child in model.named_children()
                        if any(m is model.get_input_embeddings() for m in child.modules()))
    for qualname, module in base.named_modules():
        style = plan.style_of(qualname)
        weight = getattr(module, "weight", None)
        if style and style != "replicate" and weight is not None and weight.dim() == 2:
            rows, cols = weight.shape
            conv1d = type(module).__name__ == "Conv1D"
            in_features = rows if conv1d else cols
            check_split_features(qualname, style, cols if conv1d else rows, in_features, tp, shape)
            name = f"{prefix}.{qualname}.weight"
            block = (blocks or {}).get(name)
            if style.startswith("rowwise") and block and (in_features // tp) % block:
                raise UsageError(f"--tp {tp}: each rank's {in_features // tp} input features of {name} cut its "
                                 f"quantization blocks of {block}; choose a --tp that leaves whole blocks, or "
                                 "quantize again with a smaller --block-size")
