"""One config layer for every subcommand, and the one place each setting is declared.

Each section model below is also the parameter object of its library call
(quantize_model takes a QuantizeSettings, serve a ServeSettings, ...); the CLI
generates its options from the same fields (their descriptions are the --help
text), and pipeline steps derive their parameters from them. Choices are the
Literal types here; default values live in configs/default.yaml alone.

Precedence, highest first: CLI flag > ORION_* environment variable > --config FILE
> configs/default.yaml. A key missing from default.yaml is an error in the
shipped file, not a silent second default here.

Environment variables are ORION_<KEY> for top-level keys (ORION_REGISTRY) and
ORION_<SECTION>_<KEY> for section keys (ORION_SERVE_PORT, ORION_QUANTIZE_BLOCK_SIZE).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError, UsageError
from .resources import resource_path
from .sizes import parse_size

CONFIG_ENV = "ORION_CONFIG"
# ORION_* variables that are not config keys; everything else under a known
# section prefix must name a real key.
NON_CONFIG_ENV = {CONFIG_ENV}

QuantLevel = Literal["q4", "q3", "q2"]
QuantMethod = Literal["auto", "gptq", "rtn", "kquant", "hqq"]
MergeMethod = Literal["linear", "slerp", "ties", "dare", "dare_linear"]
Dtype = Literal["float32", "float16", "bfloat16"]
ServeEngine = Literal["auto", "torch", "onnxruntime"]
OnnxAttention = Literal["auto", "exported"]
Backend = Literal["auto", "nccl", "gloo"]
# Codecs of a pipeline-stage link: `auto` sends small tensors raw; `json` is for debugging only (5x the bytes).
LinkCodec = Literal["raw", "zstd", "fp16", "bf16", "int8", "fp16+zstd", "bf16+zstd", "int8+zstd", "auto", "json"]


def choices(literal: Any) -> tuple[str, ...]:
    return tuple(get_args(literal))


def Setting(description: str, *, short: str | None = None, metavar: str | None = None, cli: bool = True,
            **bounds: Any) -> Any:
    """A field of a section: its --help text, and how its generated CLI option is spelled."""
    extra = {"short": short, "metavar": metavar, "cli": cli}
    return Field(description=description, json_schema_extra={k: v for k, v in extra.items() if v is not None},
                 **bounds)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_a_size(value: str | int) -> str | int:
    try:
        parse_size(value)
    except UsageError:
        raise ValueError("not a size; write e.g. 500 (MB), 500MB, 2GB or 1.5GiB") from None
    return value


def _is_a_fraction(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError("must be a fraction in (0, 1]")
    return value


# YAML reads a bare 500 (MB) as a number, so a size is either.
Size = Annotated[str | int, AfterValidator(_is_a_size)]


class QuantizeSettings(_Section):
    level: QuantLevel = Setting("Formats and a size budget: q4 (4/8 bits) 0.16x, q3 and q2 (2/4 bits) 0.13x and "
                                "0.10x of fp32; each tensor's format by measured KL.", short="-l")
    size_budget: Annotated[float, AfterValidator(_is_a_fraction)] | None = Setting(
        "Every byte of the ONNX files as a fraction of the fp32 weights' (null: the level's).", metavar="FRACTION")
    block_size: int | None = Setting("Weights sharing one scale: 16..256, a power of two (null: the level's "
                                     "formats).", metavar="N", ge=16, le=256)
    method: QuantMethod = Setting("Algorithm; auto is GPTQ for linear layers and k-quant for the embedding.")
    low_cpu_mem: bool = Setting("Accepted and ignored: quantize always works a layer at a time now.")
    keep_intermediate: bool = Setting("Keep the fp32 ONNX export in OUT/onnx.")
    eval_text: str | None = Setting("Text to calibrate on (its first windows) and evaluate on (the rest); "
                                    "null: the reference corpus.", metavar="FILE")
    calibration_tokens: int = Setting("Tokens of calibration text (GPTQ statistics, the sensitivity sample).",
                                      metavar="N", ge=128)
    calibration_minutes: float = Setting("With method auto: calibration is cut to finish in about this many "
                                         "minutes on this machine (fewer tokens; below 1024, rtn).",
                                         metavar="MIN", gt=0)
    eval_tokens: int = Setting("Tokens of held-out text --test evaluates on.", metavar="N", ge=128)
    prompt: str = Setting("The prompt --test completes greedily.", metavar="TEXT")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError("must be a power of two (16, 32, 64, 128 or 256)")
        return value


class MergeSettings(_Section):
    method: MergeMethod = Setting("linear normalizes the ratios; slerp takes t = second / sum; ties, dare "
                                  "(mergekit's dare_ties) and dare_linear merge task vectors against --base.")
    dtype: Dtype = Setting("Dtype of the merged weights (arithmetic is float32).")
    density: Annotated[float, AfterValidator(_is_a_fraction)] = Setting("Fraction of each task vector kept by ties "
                                                                        "and dare.")
    seed: int = Setting("Seed of dare's random drop.", ge=0, lt=2**32)
    allow_crimes: bool = Setting("Merge even when architectures or tensor shapes differ, as mergekit's "
                                 "--allow-crimes.")
    max_shard_size: Size = Setting("Merged weights are written in files of at most this size; it bounds the "
                                   "merge's memory.", metavar="SIZE")


class ShardSettings(_Section):
    shards: int | None = Setting("Number of shards, balanced by bytes.", short="-n", metavar="N", ge=1)
    max_shard_size: Size | None = Setting("Largest shard: 500 (MB), 500MB, 2GB, 1.5GiB.", metavar="SIZE")


class ServeSettings(_Section):
    host: str = Setting("Address to bind.")
    port: int = Setting("HTTP port (0 picks a free one).", ge=0, le=65535)
    engine: ServeEngine = Setting("torch (torchrun ranks, --tp/--pp) or onnxruntime (one process; a checkpoint is "
                                  "exported to fp32 ONNX once, into cache_dir); auto: onnxruntime for an ONNX "
                                  "model served whole, else torch, but onnxruntime for a checkpoint served whole "
                                  "whose transformers class the torch engine cannot run (StableLM).")
    tp: int = Setting("Tensor-parallel ranks per pipeline stage.", ge=1)
    pp: int = Setting("Pipeline stages (typically one per node).", ge=1)
    pp_split: str | None = Setting("Layers per stage, e.g. 10,14 (null: even).", metavar="N,M,..")
    nnodes: int = Setting("Machines taking part; run orion serve on each.", ge=1)
    node_rank: int = Setting("This machine's place (0 serves HTTP and runs the first stage).", ge=0)
    master_addr: str = Setting("Rendezvous host (node 0's address).")
    master_port: int = Setting("Rendezvous port on node 0.", ge=1, le=65535)
    api_key: str | None = Setting("Require 'Authorization: Bearer KEY' on /v1 routes.", metavar="KEY")
    backend: Backend = Setting("torch.distributed backend (auto: nccl with CUDA, else gloo).")
    activation_codec: LinkCodec = Setting("Codec of hidden states between pipeline stages (json: debugging only).",
                                          metavar="CODEC")
    max_batch_size: int = Setting("Requests decoded together (continuous batching).", ge=1)
    max_model_len: int = Setting("Prompt + completion tokens per request.", ge=1)
    onnx_attention: OnnxAttention = Setting("onnxruntime engine: auto runs each layer's attention as onnxruntime's "
                                            "GroupQueryAttention over a static KV cache where the graph's "
                                            "attention is recognized; exported keeps the graph's own (its cache "
                                            "is copied every step).")
    prefix_cache_mib: int = Setting("MiB of recent prompts' key/value caches the onnxruntime engine keeps, so a "
                                    "request that starts the same way prefills only the rest; 0 turns it off.",
                                    ge=0, metavar="MIB")
    dtype: Dtype = Setting("Weight and activation dtype (on CPU, half precision needs native instructions: "
                           "AVX512-BF16/AMX-BF16 or AVX512-FP16/AMX-FP16; float32 otherwise).")
    max_restarts: int = Setting("Restarts of the worker group after a failure.", ge=0)
    drain_timeout: float = Setting("Seconds SIGTERM waits for in-flight requests.", gt=0)
    max_request_bytes: int = Setting("Largest HTTP request body; larger ones get 413.", ge=1, metavar="BYTES")
    trust_remote_code: bool = Setting("Run a model whose config names custom modeling code (auto_map), as "
                                      "transformers' trust_remote_code does.")


class CodecSettings(_Section):
    auto_threshold_bytes: int = Setting("auto sends smaller tensors raw: compressing them costs more than it saves.",
                                        ge=0)
    int8_block_size: int = Setting("Elements sharing one int8 scale; smaller is more exact and larger.",
                                   ge=1, le=2**20)
    zstd_level: int = Setting("zstd level, 1..22; levels above 1 barely shrink activations and cost time.",
                              ge=1, le=22)
    stream_chunk_bytes: int = Setting("Hidden states larger than this cross a stage link in chunks of this many "
                                      "bytes, so neither side holds a whole encoded copy.", ge=1)


class OrionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    registry: str
    output_root: str
    cache_dir: str | None
    quantize: QuantizeSettings
    merge: MergeSettings
    shard: ShardSettings
    serve: ServeSettings
    codec: CodecSettings

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "orion"


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in OrionConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
}
TOP_LEVEL_KEYS = [name for name in OrionConfig.model_fields if name not in SECTIONS]
S = TypeVar("S", bound=_Section)


def flag_of(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def override(settings: S, **flags: Any) -> S:
    """`settings` with the flags that were given (not None) over it, validated; errors name the flag.

    This is where a command's flags meet the config: one copy of the section
    with the given values replaced.
    """
    given = {name: value for name, value in flags.items() if value is not None}
    if not given:
        return settings
    try:
        return type(settings).model_validate({**settings.model_dump(), **given})
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        value = given.get(name)
        shown = value if first["type"] == "literal_error" or not isinstance(value, str) else repr(value)
        raise UsageError(f"{flag_of(name)} {shown}: {problem_of(first)}") from None


_BOUNDS = {"greater_than_equal": ("ge", "must be at least"), "less_than_equal": ("le", "must be at most"),
           "greater_than": ("gt", "must be more than"), "less_than": ("lt", "must be less than")}


def problem_of(error: Mapping[str, Any]) -> str:
    """A pydantic error as a user reads it: the choices of a Literal, a bound, a validator's own words."""
    if error["type"] == "literal_error":
        return "choose from " + ", ".join(part.strip(" '") for part in error["ctx"]["expected"].replace(" or ", ", ").split(","))
    if error["type"] in _BOUNDS:
        key, words = _BOUNDS[error["type"]]
        return f"{words} {error['ctx'][key]}"
    return str(error["msg"]).removeprefix("Value error, ")


@lru_cache(maxsize=1)
def shipped_config() -> OrionConfig:
    """configs/default.yaml alone: the defaults a library call uses when given no settings."""
    return load_config(default_config_path(), environ={}, defaults_only=True)


def default_config_path() -> Path:
    return resource_path("configs/default.yaml")


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; errors name the file (and line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} {path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of keys, found {type(data).__name__}")
    return data


def _deep_merge(base: Mapping[str, Any], override_: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override_.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Config overrides from ORION_* variables, and which variable set each key."""
    layer: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for var, raw in environ.items():
        if not var.startswith("ORION_") or var in NON_CONFIG_ENV:
            continue
        name = var[len("ORION_"):].lower()
        value: Any = None if raw.strip().lower() in ("", "null", "none") else raw
        if name in TOP_LEVEL_KEYS:
            layer[name] = value
            origin[(name,)] = var
            continue
        section = next((s for s in SECTIONS if name.startswith(s + "_")), None)
        if section is None:
            continue  # not a config variable (e.g. set for another tool)
        key = name[len(section) + 1:]
        if key not in SECTIONS[section].model_fields:
            raise ConfigError(f"environment variable {var}: '{section}' has no key '{key}'")
        layer.setdefault(section, {})[key] = value
        origin[(section, key)] = var
    return layer, origin


def _describe(exc: ValidationError) -> tuple[tuple[str, ...], str]:
    first = exc.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return loc, "unknown key"
    if first["type"] == "missing":
        return loc, "missing key"
    return loc, f"{problem_of(first)} (got {first.get('input')!r})"


def load_config(config_file: str | Path | None = None, environ: Mapping[str, str] | None = None,
                defaults_only: bool = False) -> OrionConfig:
    """Resolve defaults, an optional config file and ORION_* variables into one validated config.

    Each layer is validated as it is applied, so an error names the layer at fault.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = environ[CONFIG_ENV]

    default_path = default_config_path()
    merged = read_yaml_mapping(default_path)
    config = _validate(merged, lambda loc: f"shipped defaults {default_path}: key '{'.'.join(loc)}'")
    if defaults_only:
        return config

    if config_file is not None:
        path = Path(config_file)
        merged = _deep_merge(merged, read_yaml_mapping(path))
        _validate(merged, lambda loc: f"config file {path}: key '{'.'.join(loc)}'")

    env_layer, origin = _env_layer(environ)
    merged = _deep_merge(merged, env_layer)
    return _validate(merged, lambda loc: f"environment variable {origin.get(loc, 'ORION_' + '_'.join(loc).upper())}")


def _validate(data: dict[str, Any], where) -> OrionConfig:
    try:
        return OrionConfig.model_validate(data)
    except ValidationError as exc:
        loc, problem = _describe(exc)
        raise ConfigError(f"{where(loc)}: {problem}") from None
