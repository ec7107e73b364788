"""A merge described by a mergekit YAML, run as mergekit-yaml would run it.

Relative paths resolve against the current directory, as mergekit-yaml does;
models may also be registry keys; nothing is downloaded (LoRA adapters and
'@revision' hub references are refused).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import MergeSettings, override, read_yaml_mapping, shipped_config
from ..errors import ConfigError, UnsupportedModelError
from ..producing import Output, Source, resolve_source
from ..progress import NULL_PROGRESS, ProgressReporter
from .execute import MergePlan, MergeResult, execute
from .refs import map_model_refs, model_ref, validated


def merge_from_config(
    config_file: str | Path,
    output: str | Path | Output | None = None,
    *,
    settings: MergeSettings | None = None,
    progress: ProgressReporter = NULL_PROGRESS,
    **overrides: Any,
) -> MergeResult:
    """Merge as the YAML says; of `settings` only seed, allow_crimes and max_shard_size apply."""
    started = time.perf_counter()
    settings = override(settings or shipped_config().merge, **overrides)
    output = Output.of(output).resolved()
    config_file = Path(config_file)
    raw = read_yaml_mapping(config_file, what="merge config")
    found: dict[Path, Source] = {}

    def resolve(value: str, where: str, is_path: bool) -> Any:
        name = value if is_path else _local_name(value, config_file, where)
        source = resolve_source(f"merge config {config_file}: {where}", name, output.registry)
        if source.model.format == "onnx":
            raise UnsupportedModelError(f"{source.label}: ONNX weights cannot be merged; merge the safetensors model "
                                        "it was exported from")
        found.setdefault(source.path.resolve(), source)
        return str(source.path) if is_path else model_ref(source.path)

    resolved = map_model_refs(raw, resolve)
    merge_config = validated(resolved, f"merge config {config_file}")
    for ref in merge_config.referenced_models():  # forms the walk above did not reach
        if ref.lora is not None:
            raise UnsupportedModelError(f"merge config {config_file}: model {ref}: LoRA adapters are not merged by orion; "
                                        "merge the adapter into its model first")
        if Path(ref.model.path).resolve() not in found:
            raise ConfigError(f"merge config {config_file}: model {ref.model.path!r}: write models as strings or {{model: PATH}}")
    donor_path = Path(_first_model(merge_config).model.path).resolve()
    parameters = {
        "config_file": str(config_file.absolute()),
        "mergekit_method": merge_config.merge_method,
        "seed": settings.seed,
        "allow_crimes": settings.allow_crimes,
    }
    plan = MergePlan(
        config=resolved, sources=list(found.values()), donor=found[donor_path], parameters=parameters,
        whole_models=bool(merge_config.models),
        mergekit_tokenizer=bool(merge_config.tokenizer_source or merge_config.tokenizer or merge_config.chat_template),
        default_name=f"merge-{config_file.stem}", extra_inputs=[("--config", config_file)],
    )
    return execute(plan, output, settings=settings, progress=progress, started=started)


def read_merge_config(config_file: str | Path):
    """A mergekit YAML parsed and validated (keys, types, merge method) without touching its models."""
    config_file = Path(config_file)
    return validated(read_yaml_mapping(config_file, what="merge config"), f"merge config {config_file}")


def _local_name(value: str, config_file: Path, where: str) -> str:
    from mergekit.common import ModelReference

    try:
        ref = ModelReference.parse(value)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"merge config {config_file}: {where}: {exc}") from None
    if ref.lora is not None:
        raise UnsupportedModelError(
            f"merge config {config_file}: {where} {value}: LoRA adapters are not merged by orion; merge the adapter into its model first"
        )
    if ref.model.revision is not None:
        raise UnsupportedModelError(
            f"merge config {config_file}: {where} {value}: '@revision' names a hub revision; orion merge takes local directories and registry keys"
        )
    return ref.model.path


def _first_model(config):
    """The model a mergekit YAML names first (its base when it has one)."""
    if config.base_model:
        return config.base_model
    if config.models:
        return config.models[0].model
    if config.slices:
        return config.slices[0].sources[0].model
    module = next(iter(config.modules.values()))
    return module.models[0].model if module.models else module.slices[0].sources[0].model
