"""orion merge: linear, slerp, ties and dare merges of local models through mergekit.

Two ways in: merge_models() builds a mergekit configuration from flags, and
merge_from_config() takes a mergekit YAML as is. Both check the inputs before
anything is written (directories, architectures, tensor shapes read from the
safetensors headers), run mergekit's run_merge in this process, and build the
output in a temporary directory that becomes the output only when all is done.

Offline by construction: every model reference handed to mergekit is the
absolute path of an existing directory, so neither its loader nor its
model-card writer ever takes a name for a Hugging Face repository.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from .atomic import atomic_output_dir, check_output
from .checkpoint import CheckpointReader
from .config import read_yaml_mapping
from .errors import ConfigError, UnsupportedModelError, UsageError
from .merge_verify import check_complete, inferred_architecture, uncovered_tensors
from .modeldir import METADATA_FILE, SUPPORT_FILES, ModelDir, copy_support_files, inspect_model_dir
from .progress import NULL_PROGRESS, ProgressReporter
from .provenance import describe_source, make_provenance
from .registry import Registry, register_model, resolve_model_ref
from .sizes import parse_size

log = logging.getLogger(__name__)

# orion's method names and the mergekit methods behind them
MERGEKIT_METHODS = {"linear": "linear", "slerp": "slerp", "ties": "ties", "dare": "dare_ties", "dare_linear": "dare_linear"}
TASK_VECTOR_METHODS = ("ties", "dare", "dare_linear")
RANDOM_METHODS = ("dare", "dare_linear")
DTYPES = ("float32", "float16", "bfloat16")
MERGEKIT_CONFIG_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"
# Layouts mergekit's loader finds by itself; any other layout CheckpointReader reads
# (orion shard_manifest.json, oddly named files) is shown to it through a view.
_MERGEKIT_LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Keys of a mergekit YAML whose string values name models ("union" and "base" are tokenizer modes).
_MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")
_NOT_MODELS = ("union", "base")
# Characters mergekit reads inside a model string: '+' joins a LoRA, '@' a hub revision.
_SPECIAL_IN_REFS = ("+", "@", '"', " ")


@dataclass(frozen=True)
class MergeInput:
    """A model as the user named it, and the directory holding its config and weights."""

    flag: str  # where it was named: "--models", "merge.yml: models[1].model"
    ref: str  # as it was written there: a directory or a registry key
    model: ModelDir
    key: str | None  # the registry key, when it was given as one

    @property
    def label(self) -> str:
        return f"{self.flag} {self.ref}"

    @property
    def path(self) -> Path:
        return self.model.path.absolute()


@dataclass
class MergeResult:
    output: Path
    method: str  # mergekit's merge_method
    parameters: dict[str, Any]
    sources: list[dict[str, Any]]
    weight_files: list[str]
    mergekit_version: str
    registered: str | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "method": self.method,
            "parameters": self.parameters,
            "sources": self.sources,
            "weight_files": self.weight_files,
            "mergekit_version": self.mergekit_version,
            "registered": self.registered,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class _Plan:
    config: dict[str, Any]  # the mergekit configuration, every model an absolute path
    inputs: list[MergeInput]  # distinct models, in the order they are named
    donor: MergeInput  # gives the tokenizer and generation config: the base, else the first model
    parameters: dict[str, Any]  # what provenance records
    whole_models: bool  # every input is merged whole, so all must hold the same tensors
    mergekit_tokenizer: bool  # the YAML asks mergekit to build the tokenizer itself


# -- from flags ---------------------------------------------------------------


def merge_models(
    models: Sequence[str | Path],
    output: str | Path,
    *,
    ratios: Sequence[float] | None = None,
    method: str = "linear",
    base: str | Path | None = None,
    density: float = 0.5,
    seed: int = 0,
    dtype: str = "float32",
    allow_crimes: bool = False,
    force: bool = False,
    register: str | None = None,
    registry_path: str | Path = "models.json",
    max_shard_size: str | int = "1GB",
    progress: ProgressReporter = NULL_PROGRESS,
) -> MergeResult:
    """Merge local models (directories or registry keys) with one of orion's methods.

    linear: weighted average, ratios normalized to sum to 1. slerp: two models,
    t = ratios[1] / sum(ratios), so t=0 is the first model. ties, dare (mergekit's
    dare_ties) and dare_linear: task vectors against `base` (default: the first
    model, whose own ratio is then unused), `density` of each kept, dare's random
    drop seeded by `seed`. `dtype` is the dtype written; arithmetic is float32.
    """
    started = time.perf_counter()
    ratios = _check_flags(models, ratios, method, base, density, seed, dtype)
    shard_bytes = parse_size(max_shard_size, flag="merge.max_shard_size")
    inputs = [_resolve("--models", str(ref), registry_path) for ref in models]
    _check_distinct(inputs)
    base_input = _resolve("--base", str(base), registry_path) if base is not None else inputs[0]
    _check_outputs(output, force, register, registry_path, inputs + [base_input])
    plan = _plan_from_flags(inputs, ratios, method, base_input, density, seed, dtype, [str(m) for m in models], base)
    plan.parameters["allow_crimes"] = allow_crimes
    return _execute(plan, output, seed=seed, allow_crimes=allow_crimes, force=force, register=register,
                    registry_path=registry_path, shard_bytes=shard_bytes, progress=progress, started=started)


def _check_flags(models, ratios, method, base, density, seed, dtype) -> list[float]:
    if method not in MERGEKIT_METHODS:
        raise UsageError(f"--method {method}: choose from {', '.join(MERGEKIT_METHODS)}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose from {', '.join(DTYPES)}")
    if not models:
        raise UsageError("--models: name the models to merge (--models A B ...), or pass --config FILE")
    if method == "slerp" and len(models) != 2:
        raise UsageError(f"--method slerp interpolates between exactly two models; --models names {len(models)}")
    if method == "linear" and len(models) < 2:
        raise UsageError("--method linear needs at least two --models")
    if base is not None and method not in TASK_VECTOR_METHODS:
        raise UsageError(f"--base applies to ties, dare and dare_linear, not to --method {method}")
    if not 0.0 < density <= 1.0:
        raise UsageError(f"--density {density}: the fraction kept must be in (0, 1]")
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed {seed}: must be in [0, 2^32)")
    if ratios is None or len(ratios) == 0:
        return [1.0] * len(models)
    ratios = [float(r) for r in ratios]
    if len(ratios) != len(models):
        raise UsageError(f"--ratios: {len(ratios)} ratios for {len(models)} models; give one ratio per model")
    for ratio in ratios:
        if not math.isfinite(ratio) or ratio < 0:
            raise UsageError(f"--ratios {ratio:g}: ratios are weights and must be finite and >= 0")
    if sum(ratios) <= 0:
        raise UsageError("--ratios: all ratios are 0; at least one model must have weight")
    return ratios


def _plan_from_flags(inputs, ratios, method, base_input, density, seed, dtype, given, given_base) -> _Plan:
    merge_method = MERGEKIT_METHODS[method]
    parameters: dict[str, Any] = {"method": method, "mergekit_method": merge_method, "models": given, "ratios": ratios}
    config: dict[str, Any] = {"merge_method": merge_method}
    if method == "linear":
        # base_model only fixes which model's config.json the output takes: mergekit
        # otherwise picks one from a set, which differs between runs.
        config["base_model"] = _ref(inputs[0].path)
        config["models"] = [{"model": _ref(i.path), "parameters": {"weight": r}} for i, r in zip(inputs, ratios)]
        parameters["weights"] = [r / sum(ratios) for r in ratios]
    elif method == "slerp":
        t = ratios[1] / sum(ratios)
        config["base_model"] = _ref(inputs[0].path)
        config["models"] = [{"model": _ref(i.path)} for i in inputs]
        config["parameters"] = {"t": t}
        parameters["t"] = t
    else:
        others = [(i, r) for i, r in zip(inputs, ratios) if not _same(i, base_input)]
        if not others:
            raise UsageError(f"--method {method}: --models names only the base model; add models whose task vectors to merge")
        if not any(r > 0 for _, r in others):
            raise UsageError(f"--ratios: every model but the base has ratio 0, so --method {method} would return the base")
        config["base_model"] = _ref(base_input.path)
        config["models"] = [{"model": _ref(base_input.path)}] + [
            {"model": _ref(i.path), "parameters": {"weight": r, "density": density}} for i, r in others
        ]
        parameters["base"] = given_base if given_base is not None else given[0]
        parameters["density"] = density
        if method in RANDOM_METHODS:
            parameters["seed"] = seed
    config["dtype"] = "float32"
    if dtype != "float32":
        config["out_dtype"] = dtype
    parameters["dtype"] = dtype
    distinct = list(inputs) + ([base_input] if not any(_same(base_input, i) for i in inputs) else [])
    donor = base_input if method in TASK_VECTOR_METHODS else inputs[0]
    return _Plan(config, distinct, donor, parameters, whole_models=True, mergekit_tokenizer=False)


# -- from a mergekit YAML -----------------------------------------------------


def merge_from_config(
    config_file: str | Path,
    output: str | Path,
    *,
    seed: int = 0,
    allow_crimes: bool = False,
    force: bool = False,
    register: str | None = None,
    registry_path: str | Path = "models.json",
    max_shard_size: str | int = "1GB",
    progress: ProgressReporter = NULL_PROGRESS,
) -> MergeResult:
    """Run a mergekit YAML as mergekit-yaml would (relative paths against the current
    directory), except that models may also be registry keys and nothing is downloaded."""
    started = time.perf_counter()
    config_file = Path(config_file)
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed {seed}: must be in [0, 2^32)")
    shard_bytes = parse_size(max_shard_size, flag="merge.max_shard_size")
    raw = read_yaml_mapping(config_file, what="merge config")

    found: dict[Path, MergeInput] = {}

    def resolve(value: str, where: str, is_path: bool) -> Any:
        name = value if is_path else _local_name(value, config_file, where)
        found_input = _resolve(f"merge config {config_file}: {where}", name, registry_path)
        found.setdefault(found_input.path.resolve(), found_input)
        return str(found_input.path) if is_path else _ref(found_input.path)

    resolved = _map_model_refs(raw, resolve)
    merge_config = _validated(resolved, f"merge config {config_file}")
    for ref in merge_config.referenced_models():  # forms the walk above did not reach
        if ref.lora is not None:
            raise UnsupportedModelError(f"merge config {config_file}: model {ref}: LoRA adapters are not merged by orion; "
                                        "merge the adapter into its model first")
        if Path(ref.model.path).resolve() not in found:
            raise ConfigError(f"merge config {config_file}: model {ref.model.path!r}: write models as strings or {{model: PATH}}")
    inputs = list(found.values())
    _check_outputs(output, force, register, registry_path, inputs, [("--config", config_file)])
    donor_path = Path(_first_model(merge_config).model.path).resolve()
    parameters = {
        "config_file": str(config_file.absolute()),
        "mergekit_method": merge_config.merge_method,
        "seed": seed,
        "allow_crimes": allow_crimes,
    }
    plan = _Plan(
        config=resolved,
        inputs=inputs,
        donor=found[donor_path],
        parameters=parameters,
        whole_models=bool(merge_config.models),
        mergekit_tokenizer=bool(merge_config.tokenizer_source or merge_config.tokenizer or merge_config.chat_template),
    )
    return _execute(plan, output, seed=seed, allow_crimes=allow_crimes, force=force, register=register,
                    registry_path=registry_path, shard_bytes=shard_bytes, progress=progress, started=started)


def read_merge_config(config_file: str | Path):
    """A mergekit YAML parsed and validated (keys, types, merge method) without touching its models."""
    config_file = Path(config_file)
    return _validated(read_yaml_mapping(config_file, what="merge config"), f"merge config {config_file}")


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


def _map_model_refs(node: Any, fn: Callable[[str, str, bool], Any], where: str = "") -> Any:
    """A copy of a mergekit config with every model reference replaced by fn(value, where, is_path)."""
    if isinstance(node, dict):
        mapped = {}
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key in _MODEL_KEYS and isinstance(value, str) and value not in _NOT_MODELS:
                mapped[key] = fn(value, here, False)
            elif key == "path" and isinstance(value, str):  # the {model: {path: ...}} form
                mapped[key] = fn(value, here, True)
            else:
                mapped[key] = _map_model_refs(value, fn, here)
        return mapped
    if isinstance(node, list):
        return [_map_model_refs(value, fn, f"{where}[{index}]") for index, value in enumerate(node)]
    return node


def _validated(data: dict[str, Any], where: str):
    """mergekit's MergeConfiguration for data, or a ConfigError naming the key at fault."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import REGISTERED_MERGE_METHODS
    from pydantic import ValidationError

    try:
        config = MergeConfiguration.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{where}: key '{key}': {first['msg']}") from None
    except (RuntimeError, ValueError) as exc:  # mergekit's own validators raise RuntimeError
        raise ConfigError(f"{where}: {exc}") from None
    if config.merge_method not in REGISTERED_MERGE_METHODS:
        raise ConfigError(
            f"{where}: key 'merge_method': unknown method {config.merge_method!r}; "
            f"mergekit {_mergekit_version()} has {', '.join(sorted(REGISTERED_MERGE_METHODS))}"
        )
    return config


# -- shared checks ------------------------------------------------------------


def _check_outputs(output, force: bool, register: str | None, registry_path, inputs: list[MergeInput],
                   others: Sequence[tuple[str, Path]] = ()) -> None:
    """Before any work: the output is free and none of the inputs (nor inside or around one), the key is free."""
    named = [(item.flag, item.model.root) for item in inputs] + [(item.flag, item.path) for item in inputs]
    check_output(Path(output), force, [*named, *others])
    if register:
        Registry(registry_path).check_key_free(register, force)


def _resolve(flag: str, ref: str, registry_path) -> MergeInput:
    path, key = resolve_model_ref(ref, registry_path, flag=flag)
    model = inspect_model_dir(path, flag=flag).check_weights()
    if model.format == "onnx":
        raise UnsupportedModelError(f"{flag} {ref}: ONNX weights cannot be merged; merge the safetensors model it was exported from")
    return MergeInput(flag=flag, ref=ref, model=model, key=key)


def _same(a: MergeInput, b: MergeInput) -> bool:
    return a.path.resolve() == b.path.resolve()


def _check_distinct(inputs: list[MergeInput]) -> None:
    for index, later in enumerate(inputs):
        for earlier in inputs[:index]:
            if _same(earlier, later):
                what = f"{later.ref} is listed twice" if earlier.ref == later.ref else f"{earlier.ref} and {later.ref} are the same model"
                raise UsageError(f"--models: {what}")


def check_compatible(inputs: Sequence[MergeInput], whole_models: bool = True,
                     shapes_of: Sequence[dict[str, tuple[int, ...]]] | None = None) -> None:
    """Same architecture and same tensor shapes, from config.json and the weights' headers.

    Raises UnsupportedModelError naming the first tensor that differs and both shapes.
    With whole_models, every input must also hold the same tensor names.
    """
    shapes_of = list(shapes_of) if shapes_of is not None else [_tensor_shapes(item) for item in inputs]
    first = inputs[0]
    for other in inputs[1:]:
        if other.model.architecture != first.model.architecture:
            raise UnsupportedModelError(
                f"{other.label}: architecture {other.model.architecture} differs from {first.model.architecture} "
                f"of {first.label}; pass --allow-crimes to merge them anyway"
            )
    reference = shapes_of[0]
    for other, shapes in zip(inputs[1:], shapes_of[1:]):
        for name, shape in reference.items():
            if name not in shapes:
                if whole_models:
                    raise UnsupportedModelError(
                        f"{other.label}: has no tensor {name}, which {first.label} has; pass --allow-crimes to merge them anyway"
                    )
            elif shapes[name] != shape:
                raise UnsupportedModelError(
                    f"{other.label}: tensor {name} has shape {_shape(shapes[name])} but {_shape(shape)} in "
                    f"{first.label}; pass --allow-crimes to merge them anyway"
                )
        extra = next((name for name in shapes if name not in reference), None)
        if whole_models and extra is not None:
            raise UnsupportedModelError(
                f"{other.label}: has tensor {extra}, which {first.label} lacks; pass --allow-crimes to merge them anyway"
            )


def _tensor_shapes(item: MergeInput) -> dict[str, tuple[int, ...]]:
    with CheckpointReader(item.path, flag=item.flag) as reader:
        shapes = {}
        for name in reader.names():
            info = reader.info(name)
            shapes[name] = info.shape if info is not None else tuple(reader.get_slice(name).get_shape())
        return shapes


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _ref(path: Path) -> str | dict[str, Any]:
    """A model reference mergekit reads back as exactly this path."""
    text = str(path)
    if any(ch in text for ch in _SPECIAL_IN_REFS):
        return {"model": {"path": text}}
    return text


# -- running ------------------------------------------------------------------


def _execute(plan: _Plan, output, *, seed, allow_crimes, force, register, registry_path, shard_bytes,
             progress: ProgressReporter, started: float) -> MergeResult:
    input_shapes = [_tensor_shapes(item) for item in plan.inputs]
    if not allow_crimes and len(plan.inputs) > 1:
        with progress.stage("Checking architectures and tensor shapes"):
            check_compatible(plan.inputs, plan.whole_models, input_shapes)
    recorded = _validated(plan.config, "merge configuration")  # before anything is written
    config_text = yaml.safe_dump(plan.config, sort_keys=False)
    mergekit_version = _mergekit_version()
    plan.parameters["mergekit_version"] = mergekit_version
    plan.parameters["mergekit_config"] = plan.config
    final = Path(output).absolute()

    hashing = _Hashing(plan.inputs)
    hashing.start()  # hashlib releases the GIL: the inputs are hashed while mergekit reads them
    inputs = [(item.flag, item.path) for item in plan.inputs]
    with atomic_output_dir(final, force, inputs=inputs) as tmp, contextlib.ExitStack() as views:
        executed = _with_views(plan, views)
        with progress.stage(f"Merging {len(plan.inputs)} models ({plan.config['merge_method']}) with mergekit"):
            # A chat_template alone makes mergekit re-save the donor's tokenizer with it.
            only_template = recorded.chat_template and not (recorded.tokenizer_source or recorded.tokenizer)
            shared = set.intersection(*(set(shapes) for shapes in input_shapes)) if plan.whole_models else set()
            _run_mergekit(executed, tmp, allow_crimes=allow_crimes, seed=seed, shard_bytes=shard_bytes,
                          copy_tokenizer=bool(only_template), shared_tensors=shared)
            check_complete(tmp, input_shapes, plan.whole_models)
        skip = {"config.json", *os.listdir(tmp)}
        if plan.mergekit_tokenizer:
            skip |= set(SUPPORT_FILES) - {"generation_config.json"}
        copy_support_files(plan.donor.path, tmp, skip=skip)
        _write_card(recorded, config_text, final.name, tmp)
        with progress.stage("Hashing the inputs for provenance"):
            sources = hashing.result()
        weight_files = sorted(p.name for p in tmp.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))
        seconds = time.perf_counter() - started
        metadata = {
            "provenance": make_provenance("merge", plan.parameters, sources),
            "merge": {"mergekit_config_file": MERGEKIT_CONFIG_FILE, "weight_files": weight_files, "seconds": round(seconds, 2)},
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    if register:
        register_model(final, register, registry_path, force=force)
    return MergeResult(
        output=final,
        method=plan.config["merge_method"],
        parameters=metadata["provenance"]["parameters"],
        sources=sources,
        weight_files=weight_files,
        mergekit_version=mergekit_version,
        registered=register,
        seconds=time.perf_counter() - started,
    )


class _Hashing(threading.Thread):
    """The inputs' provenance records, computed beside the merge.

    A daemon, so a failed merge does not wait for it.
    """

    def __init__(self, inputs: list[MergeInput]):
        super().__init__(name="orion-merge-hash", daemon=True)
        self.inputs = inputs
        self.sources: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sources = [describe_source(item.model, item.key) for item in self.inputs]
        except BaseException as exc:  # noqa: BLE001 - re-raised in result()
            self.error = exc

    def result(self) -> list[dict[str, Any]]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.sources


def _with_views(plan: _Plan, stack: contextlib.ExitStack) -> dict[str, Any]:
    """plan.config with each model mergekit cannot index pointed at an indexed view of it."""
    views: dict[Path, Path] = {}
    for item in plan.inputs:
        if not any((item.path / name).exists() for name in _MERGEKIT_LAYOUTS):
            views[item.path.resolve()] = _indexed_view(item, stack)
    if not views:
        return plan.config

    def swap(value: Any, _where: str, is_path: bool) -> Any:
        # plan.config holds paths only: plain strings, or {path: ...} where _ref needed it
        view = views.get(Path(value).resolve())
        if view is None:
            return value
        return str(view) if is_path else _ref(view)

    return _map_model_refs(plan.config, swap)


def _indexed_view(item: MergeInput, stack: contextlib.ExitStack) -> Path:
    """A directory of links to the model's files plus the index file mergekit looks for."""
    view = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="orion-merge-view-")))
    for entry in item.path.iterdir():
        (view / entry.name).symlink_to(entry.absolute())
    with CheckpointReader(item.path, flag=item.flag) as reader:
        weight_map = {name: reader.file_of(name).relative_to(item.path).as_posix() for name in reader.names()}
        safetensors = all(file.suffix == ".safetensors" for file in reader.files)
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    (view / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return view


def _run_mergekit(config: dict[str, Any], out_dir: Path, *, allow_crimes: bool, seed: int, shard_bytes: int,
                  copy_tokenizer: bool, shared_tensors: set[str]) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(
        allow_crimes=allow_crimes,
        lazy_unpickle=True,  # .bin inputs are read a tensor at a time, as safetensors are
        random_seed=seed,  # run_merge seeds random, numpy and torch with it: dare's drop is reproducible
        copy_tokenizer=copy_tokenizer,
        write_model_card=False,  # written by _write_card, with the final directory name
        out_shard_size=shard_bytes,  # the writer holds a shard in memory until it is full
        device="cpu",
        quiet=True,
    )
    merge_config = MergeConfiguration.model_validate(config)
    try:
        missed = uncovered_tensors(merge_config, options, shared_tensors) if shared_tensors else set()
        if missed:
            log.info("mergekit's description of this architecture misses %s; merging with the architecture it "
                     "infers from the checkpoints instead", ", ".join(sorted(missed)[:4]))
        with _preserved_rng(), (inferred_architecture(merge_config, options) if missed else contextlib.nullcontext()):
            run_merge(merge_config, str(out_dir), options=options)
    except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"mergekit could not merge these models: {first_line}") from exc
    finally:
        # mergekit caches open loaders per model path for the life of the process; a
        # later merge must not read a file that has since been replaced through them.
        LoaderCache().flush_all()
        LoaderCache.loaders.clear()


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """run_merge reseeds the global generators; a Python caller's random state is left as it was."""
    import numpy
    import torch

    states = random.getstate(), numpy.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _write_card(config, config_text: str, name: str, out_dir: Path) -> None:
    from mergekit.card import generate_card

    # Every reference is an absolute path, which generate_card never looks up on the hub.
    (out_dir / CARD_FILE).write_text(generate_card(config=config, config_yaml=config_text, name=name), encoding="utf-8")
    (out_dir / MERGEKIT_CONFIG_FILE).write_text(config_text, encoding="utf-8")


def _mergekit_version() -> str:
    return package_version("mergekit")
