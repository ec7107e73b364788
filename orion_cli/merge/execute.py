"""A planned merge run by mergekit's Python API inside the producing frame.

The inputs are checked before anything is written (architectures, and tensor
shapes from the weights' headers); mergekit runs in this process with lazy
loading, into the frame's temporary directory; the output is checked for
completeness (verify.py) before it is put in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from ..checkpoint import CheckpointReader
from ..config import MergeSettings
from ..errors import UnsupportedModelError
from ..modeldir import SUPPORT_FILES, copy_support_files
from ..producing import Output, Source, producing
from ..progress import ProgressReporter
from ..sizes import parse_size
from .refs import map_model_refs, mergekit_version, model_ref, validated
from .verify import check_complete, first_index_is_the_layer, inferred_architecture, uncovered_tensors

log = logging.getLogger(__name__)

MERGEKIT_CONFIG_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"
# Layouts mergekit's loader finds by itself; any other layout CheckpointReader reads
# (orion shard_manifest.json, oddly named files) is shown to it through a view.
_MERGEKIT_LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


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
class MergePlan:
    config: dict[str, Any]  # the mergekit configuration, every model an absolute path
    sources: list[Source]  # distinct models, in the order they are named
    donor: Source  # gives the tokenizer and generation config: the base, else the first model
    parameters: dict[str, Any]  # what provenance records
    whole_models: bool  # every input is merged whole, so all must hold the same tensors
    mergekit_tokenizer: bool  # the YAML asks mergekit to build the tokenizer itself
    default_name: str  # the output's name under output_root when --output is not given
    extra_inputs: list[tuple[str, Path]] = field(default_factory=list)  # files the output must not replace


def check_compatible(sources: Sequence[Source], whole_models: bool,
                     shapes_of: Sequence[dict[str, tuple[int, ...]]]) -> None:
    """Same architecture and same tensor shapes, from config.json and the weights' headers.

    Raises UnsupportedModelError naming the first tensor that differs and both shapes.
    With whole_models, every input must also hold the same tensor names.
    """
    first, reference = sources[0], shapes_of[0]
    for other in sources[1:]:
        if other.model.architecture != first.model.architecture:
            raise UnsupportedModelError(
                f"{other.label}: architecture {other.model.architecture} differs from {first.model.architecture} "
                f"of {first.label}; pass --allow-crimes to merge them anyway"
            )
    crimes = "; pass --allow-crimes to merge them anyway"
    for other, shapes in zip(sources[1:], shapes_of[1:]):
        for name, shape in reference.items():
            if name not in shapes:
                if whole_models:
                    raise UnsupportedModelError(f"{other.label}: has no tensor {name}, which {first.label} has{crimes}")
            elif shapes[name] != shape:
                raise UnsupportedModelError(f"{other.label}: tensor {name} has shape {_shape(shapes[name])} but "
                                            f"{_shape(shape)} in {first.label}{crimes}")
        extra = next((name for name in shapes if name not in reference), None)
        if whole_models and extra is not None:
            raise UnsupportedModelError(f"{other.label}: has tensor {extra}, which {first.label} lacks{crimes}")


def tensor_shapes(source: Source) -> dict[str, tuple[int, ...]]:
    with CheckpointReader(source.path, flag=source.flag) as reader:
        shapes = {}
        for name in reader.names():
            info = reader.info(name)
            shapes[name] = info.shape if info is not None else tuple(reader.get_slice(name).get_shape())
        return shapes


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def execute(plan: MergePlan, output: Output, *, settings: MergeSettings, progress: ProgressReporter,
            started: float) -> MergeResult:
    shard_bytes = parse_size(settings.max_shard_size, flag="merge.max_shard_size")
    input_shapes = [tensor_shapes(source) for source in plan.sources]
    if not settings.allow_crimes and len(plan.sources) > 1:
        with progress.stage("Checking architectures and tensor shapes"):
            check_compatible(plan.sources, plan.whole_models, input_shapes)
    recorded = validated(plan.config, "merge configuration")  # before anything is written
    config_text = yaml.safe_dump(plan.config, sort_keys=False)
    plan.parameters["mergekit_version"] = mergekit_version()
    plan.parameters["mergekit_config"] = plan.config

    with producing("merge", plan.sources, output, default_name=plan.default_name, parameters=plan.parameters,
                   extra_inputs=plan.extra_inputs, progress=progress) as out, contextlib.ExitStack() as views:
        tmp = out.tmp
        executed = _with_views(plan, views)
        with progress.stage(f"Merging {len(plan.sources)} models ({plan.config['merge_method']}) with mergekit"):
            # A chat_template alone makes mergekit re-save the donor's tokenizer with it.
            only_template = recorded.chat_template and not (recorded.tokenizer_source or recorded.tokenizer)
            shared = set.intersection(*(set(shapes) for shapes in input_shapes)) if plan.whole_models else set()
            run_mergekit(executed, tmp, allow_crimes=settings.allow_crimes, seed=settings.seed,
                         shard_bytes=shard_bytes, copy_tokenizer=bool(only_template), shared_tensors=shared)
            check_complete(tmp, input_shapes, plan.whole_models)
        skip = {"config.json", *os.listdir(tmp)}
        if plan.mergekit_tokenizer:
            skip |= set(SUPPORT_FILES) - {"generation_config.json"}
        copy_support_files(plan.donor.path, tmp, skip=skip)
        _write_card(recorded, config_text, out.output.name, tmp)
        weight_files = sorted(p.name for p in tmp.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))
        out.metadata["merge"] = {"mergekit_config_file": MERGEKIT_CONFIG_FILE, "weight_files": weight_files,
                                 "seconds": round(time.perf_counter() - started, 2)}
    return MergeResult(
        output=out.output,
        method=plan.config["merge_method"],
        parameters=plan.parameters,
        sources=out.source_records(),
        weight_files=weight_files,
        mergekit_version=plan.parameters["mergekit_version"],
        registered=out.registered,
        seconds=time.perf_counter() - started,
    )


def _with_views(plan: MergePlan, stack: contextlib.ExitStack) -> dict[str, Any]:
    """plan.config with each model mergekit cannot index pointed at an indexed view of it."""
    views: dict[Path, Path] = {}
    for source in plan.sources:
        if not any((source.path / name).exists() for name in _MERGEKIT_LAYOUTS):
            views[source.path.resolve()] = _indexed_view(source, stack)
    if not views:
        return plan.config

    def swap(value: Any, _where: str, is_path: bool) -> Any:
        # plan.config holds paths only: plain strings, or {path: ...} where model_ref needed it
        view = views.get(Path(value).resolve())
        if view is None:
            return value
        return str(view) if is_path else model_ref(view)

    return map_model_refs(plan.config, swap)


def _indexed_view(source: Source, stack: contextlib.ExitStack) -> Path:
    """A directory of links to the model's files plus the index file mergekit looks for."""
    view = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="orion-merge-view-")))
    for entry in source.path.iterdir():
        (view / entry.name).symlink_to(entry.absolute())
    with CheckpointReader(source.path, flag=source.flag) as reader:
        weight_map = {name: reader.file_of(name).relative_to(source.path).as_posix() for name in reader.names()}
        safetensors = all(file.suffix == ".safetensors" for file in reader.files)
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    (view / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return view


def run_mergekit(config: dict[str, Any], out_dir: Path, *, allow_crimes: bool, seed: int, shard_bytes: int,
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
        with first_index_is_the_layer():
            missed = uncovered_tensors(merge_config, options, shared_tensors) if shared_tensors else set()
            if missed:
                log.info("mergekit's description of this architecture does not fit these checkpoints (%s); "
                         "merging with the architecture it infers from the checkpoints instead",
                         ", ".join(sorted(missed)[:4]))
            inferred = inferred_architecture(merge_config, options) if missed else contextlib.nullcontext()
            with _preserved_rng(), inferred:
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
