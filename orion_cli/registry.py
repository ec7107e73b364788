"""The model registry, models.json, validated against models.schema.json.

Writes happen under an inter-process lock and through an atomic rename, so
parallel CI jobs that register at once lose no entry, and a models.json that is
not JSON or fails the schema is reported and never rewritten.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
from filelock import FileLock, Timeout

from .atomic import atomic_write_text
from .errors import OrionError, RegistryError, UnsupportedModelError
from .modeldir import ModelDir, hash_files, inspect_model_dir, sha256_file
from .provenance import utc_now
from .resources import resource_path

LOCK_TIMEOUT_S = 120.0


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(resource_path("models.schema.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


_PLAIN_KEY = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]*$")


def json_path(*parts: str | int) -> str:
    """A JSON path spelled as jsonschema spells it ($.models['my-key'].files[0])."""
    path = "$"
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            path += f".{part}"
        else:
            path += "['" + part.replace("\\", "\\\\").replace("'", "\\'") + "']"
    return path


def schema_errors(document: Any) -> list[tuple[str, str]]:
    """(JSON path, message) of every schema violation, in document order."""
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [(error.json_path, error.message) for error in errors]


def check_document(document: Any, source: str) -> None:
    errors = schema_errors(document)
    if errors:
        path, message = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise RegistryError(f"{source}: {path}: {message}{more}")


class Registry:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def folder(self) -> Path:
        return self.path.absolute().parent

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the registry's inter-process lock; its lock file goes with the last holder.

        The file is unlinked while still locked: a process already waiting on it
        finds its inode unlinked once it gets the lock, and filelock starts it over
        on a fresh file, so the lock never guards a name it lost.
        """
        path = self.folder / f".{self.path.name}.lock"
        held: list[int] = []
        lock = FileLock(str(path), timeout=LOCK_TIMEOUT_S, on_acquired=held.append)
        try:
            with lock:
                try:
                    yield
                finally:
                    with contextlib.suppress(OSError):
                        if held and os.path.samestat(os.fstat(held[-1]), os.lstat(path)):
                            path.unlink()
        except Timeout:
            raise RegistryError(f"registry {self.path}: another process holds its lock") from None

    # -- reading -------------------------------------------------------------

    def read(self, missing_ok: bool = True) -> dict[str, Any]:
        """The whole validated document; an absent registry reads as empty, or with missing_ok=False is an error."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if not missing_ok:
                raise RegistryError(self.missing_message()) from None
            return {"models": {}}
        except IsADirectoryError:
            raise RegistryError(f"registry {self.path}: is a directory, not a JSON file") from None
        except OSError as exc:
            raise RegistryError(f"registry {self.path}: cannot read it ({exc.strerror})") from None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"registry {self.path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "orion leaves it unchanged until it is fixed"
            ) from None
        check_document(document, f"registry {self.path}")
        return document

    def missing_message(self) -> str:
        return f"registry {self.path}: no such file (orion register creates it)"

    def entries(self, missing_ok: bool = True) -> dict[str, dict[str, Any]]:
        return self.read(missing_ok)["models"]

    def get(self, key: str) -> dict[str, Any]:
        entries = self.entries(missing_ok=False)
        if key not in entries:
            raise RegistryError(self._unknown_key_message(key, entries))
        return entries[key]

    def _unknown_key_message(self, key: str, entries: dict[str, Any]) -> str:
        close = difflib.get_close_matches(key, list(entries), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"registry {self.path}: no model with key '{key}'{hint}"

    def resolve(self, location: str) -> Path:
        """A path written in an entry, resolved against the registry's folder."""
        path = Path(location).expanduser()
        return path if path.is_absolute() else self.folder / path

    def relative(self, path: Path) -> str:
        """How an entry should spell `path`: relative when it lies under the registry's folder."""
        path = path.absolute()
        try:
            return path.relative_to(self.folder).as_posix()
        except ValueError:
            return str(path)

    def model_path(self, key: str) -> Path:
        return self.resolve(self.get(key)["urls"]["base"])

    # -- writing -------------------------------------------------------------

    def check_key_free(self, key: str, force: bool) -> None:
        """Fail before any work when --register KEY would be refused at the end."""
        check_document({"models": {key: _PLACEHOLDER_ENTRY}}, f"registry key '{key}'")
        if not force and key in self.entries():
            raise RegistryError(f"registry {self.path}: key '{key}' already exists; pass --force to replace it")

    def put(self, key: str, entry: dict[str, Any], force: bool = False) -> None:
        with self._locked():
            document = self.read()
            if key in document["models"] and not force:
                raise RegistryError(f"registry {self.path}: key '{key}' already exists; pass --force to replace it")
            document["models"][key] = entry
            self._write(document)

    def remove(self, key: str) -> dict[str, Any]:
        self.read(missing_ok=False)  # a missing or broken registry is reported before any lock is taken
        with self._locked():
            document = self.read(missing_ok=False)
            if key not in document["models"]:
                raise RegistryError(self._unknown_key_message(key, document["models"]))
            entry = document["models"].pop(key)
            self._write(document)
            return entry

    def _write(self, document: dict[str, Any]) -> None:
        check_document(document, f"new contents of registry {self.path}")
        atomic_write_text(self.path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")

    # -- checking ------------------------------------------------------------

    def problems(self, check_files: bool = False) -> list[str]:
        """Entries whose paths are missing or, with check_files, whose files changed or are not sound weights."""
        found = []
        for key, entry in self.entries(missing_ok=False).items():
            base = entry["urls"]["base"]
            if "://" in base:
                continue  # remote locations are not ours to check
            base_path = self.resolve(base)
            if not base_path.exists():
                found.append(f"{json_path('models', key, 'urls', 'base')}: {base} does not exist")
                continue
            for shard in entry["urls"].get("shards", []):
                if not self.resolve(shard).is_file():
                    found.append(f"{json_path('models', key, 'urls', 'shards')}: {shard} does not exist")
            if check_files:
                for index, record in enumerate(entry.get("files", [])):
                    where = json_path("models", key, "files", index)
                    file = base_path / record["path"]
                    if not file.is_file():
                        found.append(f"{where}: {record['path']} is missing")
                    elif file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
                        found.append(f"{where}: {record['path']} does not match its sha256")
                try:
                    inspect_model_dir(base_path, flag=json_path("models", key, "urls", "base")).check_weights()
                except OrionError as exc:
                    found.append(f"{json_path('models', key)}: {exc}")
        return found


_PLACEHOLDER_ENTRY = {"id": "x", "name": "x", "type": "causal-lm", "size_mb": 0, "urls": {"base": "x"}}


def resolve_model_ref(ref: str | Path, registry_path: str | Path, flag: str = "--model") -> tuple[Path, str | None]:
    """A model given as a directory or a registry key: (directory, key or None).

    An existing path wins over a key of the same name.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path, None
    registry = Registry(registry_path)
    if not registry.path.exists():
        raise RegistryError(f"{flag} {ref}: neither a directory nor a key in registry {registry.path} "
                            "(which does not exist)")
    entries = registry.entries()
    key = str(ref)
    if key in entries:
        return registry.model_path(key), key
    close = difflib.get_close_matches(key, list(entries), n=1)
    hint = f"; did you mean the registry key '{close[0]}'?" if close else ""
    raise RegistryError(f"{flag} {ref}: neither a directory nor a key in registry {registry.path}{hint}")


def _is_causal_lm(model: ModelDir) -> bool:
    arch = model.architecture or ""
    return arch.endswith(("ForCausalLM", "LMHeadModel")) or model.format == "onnx"


def build_entry(
    model_dir: str | Path,
    registry: Registry,
    model_id: str | None = None,
    name: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """A registry entry filled from what the model directory holds, files hashed."""
    model = inspect_model_dir(model_dir, flag="PATH").check_weights()
    if not _is_causal_lm(model):
        raise UnsupportedModelError(
            f"PATH {model_dir}: architecture {model.architecture!r} is not a causal LM; the registry holds causal-lm models"
        )
    files = hash_files(model.path)
    model_id = model_id or model.root.absolute().name
    entry: dict[str, Any] = {
        "id": model_id,
        "name": name or model_id,
        "type": "causal-lm",
        "size_mb": round(sum(f.bytes for f in files) / 1e6, 3),
        "urls": {"base": registry.relative(model.path)},
        "format": model.format,
    }
    if description:
        entry["description"] = description
    shards = _shard_files(model)
    if shards:
        entry["urls"]["shards"] = [registry.relative(p) for p in shards]
    if model.architecture:
        entry["architecture"] = model.architecture
    if model.model_type:
        entry["model_type"] = model.model_type
    metadata = model.metadata or {}
    if isinstance(metadata.get("quantization"), dict):
        quant = metadata["quantization"]
        entry["quantization"] = {k: quant[k] for k in ("level", "bits", "method", "block_size") if k in quant}
    if isinstance(metadata.get("provenance"), dict):
        entry["provenance"] = metadata["provenance"]
    entry["files"] = [f.as_dict() for f in files]
    entry["registered_at"] = utc_now()
    check_document({"models": {"entry": entry}}, f"entry built from {model_dir}")
    return entry


def _shard_files(model: ModelDir) -> list[Path]:
    manifest = model.shard_manifest
    if manifest and isinstance(manifest.get("shards"), list):
        return [model.path / shard["file"] for shard in manifest["shards"] if "file" in shard]
    weight_like = [p for p in model.weight_files if p not in model.onnx_files]
    return weight_like if len(weight_like) > 1 else []


def register_model(
    model_dir: str | Path,
    key: str,
    registry_path: str | Path,
    force: bool = False,
    model_id: str | None = None,
    name: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Inspect, hash, validate and write one entry; returns it."""
    registry = Registry(registry_path)
    registry.check_key_free(key, force)
    entry = build_entry(model_dir, registry, model_id=model_id, name=name, description=description)
    registry.put(key, entry, force=force)
    return entry
