"""One config layer for every subcommand.

Precedence, highest first: CLI flag > ORION_* environment variable > --config FILE
> configs/default.yaml. default.yaml is the single source of default values: the
models below declare types and bounds only, so a key missing there is an error in
the shipped file, not a silent second default here.

Environment variables are ORION_<KEY> for top-level keys (ORION_REGISTRY) and
ORION_<SECTION>_<KEY> for section keys (ORION_SERVE_PORT, ORION_QUANTIZE_BLOCK_SIZE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .resources import resource_path

CONFIG_ENV = "ORION_CONFIG"
# ORION_* variables that are not config keys; everything else under a known
# section prefix must name a real key.
NON_CONFIG_ENV = {CONFIG_ENV}

QuantLevel = Literal["q4", "q3", "q2"]
MergeMethod = Literal["linear", "slerp", "ties", "dare", "dare_linear"]
Dtype = Literal["float32", "float16", "bfloat16"]
ActivationCodec = Literal["raw", "zstd", "fp16", "bf16", "int8", "fp16+zstd", "bf16+zstd", "int8+zstd", "auto"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_a_size(value: str | int) -> str | int:
    from .errors import UsageError
    from .sizes import parse_size

    try:
        parse_size(value)
    except UsageError:
        raise ValueError("not a size; write e.g. 500 (MB), 500MB, 2GB or 1.5GiB") from None
    return value


# YAML reads a bare 500 (MB) as a number, so a size is either.
Size = Annotated[str | int, AfterValidator(_is_a_size)]


class QuantizeSettings(_Section):
    level: QuantLevel
    block_size: int | None = Field(ge=16, le=256)
    method: Literal["auto", "gptq", "rtn", "kquant", "hqq"]
    low_cpu_mem: bool
    keep_intermediate: bool
    eval_text: str | None
    calibration_tokens: int = Field(ge=128)
    eval_tokens: int = Field(ge=128)
    prompt: str

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError("must be a power of two (16, 32, 64, 128 or 256)")
        return value


class MergeSettings(_Section):
    method: MergeMethod
    dtype: Dtype
    density: float = Field(gt=0.0, le=1.0)
    seed: int = Field(ge=0, lt=2**32)
    allow_crimes: bool
    max_shard_size: Size


class ShardSettings(_Section):
    shards: int | None = Field(ge=1)
    max_shard_size: Size | None


class ServeSettings(_Section):
    host: str
    port: int = Field(ge=0, le=65535)
    tp: int = Field(ge=1)
    pp: int = Field(ge=1)
    backend: Literal["auto", "nccl", "gloo"]
    activation_codec: ActivationCodec
    max_batch_size: int = Field(ge=1)
    max_model_len: int = Field(ge=1)
    dtype: Dtype
    api_key: str | None
    max_restarts: int = Field(ge=0)
    master_addr: str
    master_port: int = Field(ge=1, le=65535)
    pp_split: str | None
    nnodes: int = Field(ge=1)
    node_rank: int = Field(ge=0)
    drain_timeout: float = Field(gt=0)


class CodecSettings(_Section):
    auto_threshold_bytes: int = Field(ge=0)
    int8_block_size: int = Field(ge=1, le=2**20)
    zstd_level: int = Field(ge=1, le=22)
    stream_chunk_bytes: int = Field(ge=1)


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


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
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
    return loc, f"{first['msg']} (got {first.get('input')!r})"


def load_config(config_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> OrionConfig:
    """Resolve defaults, an optional config file and ORION_* variables into one validated config.

    Each layer is validated as it is applied, so an error names the layer at fault.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = environ[CONFIG_ENV]

    default_path = default_config_path()
    merged = read_yaml_mapping(default_path)
    _validate(merged, lambda loc: f"shipped defaults {default_path}: key '{'.'.join(loc)}'")

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
