"""The frame of every command that writes a model: quantize, merge and shard keep only their own work.

    output = Output.of(output).resolved()
    sources = [resolve_source("--model", model, output.registry)]
    with producing("quantize", sources, output, default_name=..., parameters=settings.model_dump()) as out:
        ...  # write into out.tmp; put sections for metadata.json into out.metadata
    out.output, out.registered

Before the body runs, everything that can be checked is: each source is a model
directory with sound weight files, the output is free (or --force) and none of
the inputs, nor inside or around one, and the registry key is free. The sources
are hashed for provenance on a thread beside the body. On success metadata.json
gets the provenance block (operation, parameters, sources by sha256), the
directory is renamed into place and registered. `orion run` decides whether a
step is up to date by comparing that block with what the step would record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .atomic import atomic_output_dir, atomic_write_text, check_output
from .config import shipped_config
from .modeldir import METADATA_FILE, ModelDir, inspect_model_dir
from .progress import NULL_PROGRESS, ProgressReporter
from .provenance import describe_source, jsonable, make_provenance
from .registry import Registry, register_model, resolve_model_ref


@dataclass(frozen=True)
class Output:
    """Where a command that writes a model puts it, and what it may replace or register.

    A library call takes a plain path or one of these; what is left None takes
    configs/default.yaml's value (the registry file, output_root).
    """

    path: str | Path | None = None  # None: <output_root>/<the command's default name>
    force: bool = False  # replace an existing output
    register: str | None = None  # register the output under this key
    registry: str | Path | None = None  # where sources given as keys are looked up, and register writes
    output_root: str | Path | None = None

    @classmethod
    def of(cls, output: "str | Path | Output | None") -> "Output":
        return output if isinstance(output, Output) else cls(path=output)

    def resolved(self) -> "Output":
        shipped = shipped_config()
        return dataclasses.replace(self, registry=self.registry or shipped.registry,
                                   output_root=self.output_root or shipped.output_root)


@dataclass(frozen=True)
class Source:
    """A model as the user named it, and the directory holding its config and weights."""

    flag: str  # where it was named: "--model", "merge config m.yml: models[1].model"
    ref: str  # as it was written there: a directory or a registry key
    model: ModelDir
    key: str | None  # the registry key, when it was given as one

    @property
    def label(self) -> str:
        return f"{self.flag} {self.ref}"

    @property
    def path(self) -> Path:
        return self.model.path.absolute()

    def inputs(self) -> list[tuple[str, Path]]:
        """What an output must stay clear of: the directory named and the one holding the weights."""
        return [(self.flag, self.model.root), (self.flag, self.model.path)]


def resolve_source(flag: str, ref: str | Path, registry: str | Path, require_config: bool = True) -> Source:
    """A directory or registry key, inspected, its weight files checked."""
    path, key = resolve_model_ref(ref, registry, flag=flag)
    model = inspect_model_dir(path, flag=flag, require_config=require_config).check_weights()
    return Source(flag, str(ref), model, key)


class _Hashing(threading.Thread):
    """The sources' provenance records, computed beside the command's own work (hashlib releases the GIL).

    A daemon, so a failed command does not wait for it.
    """

    def __init__(self, sources: Sequence[Source]):
        super().__init__(name="orion-provenance-hash", daemon=True)
        self.sources = list(sources)
        self.records: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            seen: set[Path] = set()
            for source in self.sources:
                if source.path.resolve() not in seen:
                    seen.add(source.path.resolve())
                    self.records.append(describe_source(source.model, source.key))
        except BaseException as exc:  # noqa: BLE001 - re-raised in result()
            self.error = exc

    def result(self) -> list[dict[str, Any]]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.records


@dataclass
class Production:
    """What the body of `producing` works with, and what it leaves for metadata.json."""

    operation: str
    output: Path  # where the model will be, absolute
    tmp: Path  # where the body writes it
    sources: list[Source]
    parameters: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)  # sections beside "provenance"
    registered: str | None = None
    _hashing: _Hashing | None = None
    _progress: ProgressReporter = NULL_PROGRESS

    def source_records(self) -> list[dict[str, Any]]:
        """Path, registry key and weights sha256 of each distinct source (waits for the hashing)."""
        assert self._hashing is not None
        if self._hashing.is_alive():
            with self._progress.stage("Hashing the inputs for provenance"):
                return self._hashing.result()
        return self._hashing.result()


@contextlib.contextmanager
def producing(operation: str, sources: Sequence[Source], output: Output, *, default_name: str,
              parameters: dict[str, Any], extra_inputs: Sequence[tuple[str, str | Path]] = (),
              progress: ProgressReporter = NULL_PROGRESS) -> Iterator[Production]:
    """Check, yield a temporary output directory, then record provenance, put the output in place and register."""
    output = output.resolved()
    target = Path(output.path) if output.path is not None else Path(output.output_root) / default_name
    inputs = [pair for source in sources for pair in source.inputs()] + list(extra_inputs)
    check_output(target, output.force, inputs)
    if output.register:
        Registry(output.registry).check_key_free(output.register, output.force)
    hashing = _Hashing(sources)
    hashing.start()
    final = target.absolute()
    with atomic_output_dir(final, output.force, inputs=inputs) as tmp:
        production = Production(operation, final, tmp, list(sources), parameters, _hashing=hashing,
                                _progress=progress)
        yield production
        metadata = {"provenance": make_provenance(operation, parameters, production.source_records()),
                    **production.metadata}
        atomic_write_text(tmp / METADATA_FILE, json.dumps(jsonable(metadata), indent=2) + "\n")
    if output.register:
        register_model(final, output.register, output.registry, force=output.force)
        production.registered = output.register


def recorded_provenance(output: str | Path) -> dict[str, Any]:
    """The provenance block `producing` wrote into an output, or {} when there is none to read."""
    path = Path(output) / METADATA_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("provenance") or {}
    except (OSError, ValueError, AttributeError):
        return {}
