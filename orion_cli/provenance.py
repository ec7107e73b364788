"""The provenance block every producing command writes into its metadata.json.

The registry reads the same block back, so what `orion quantize` records and
what `orion register` shows cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from . import __version__
from .modeldir import ModelDir, weights_digest


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def describe_source(model: ModelDir, key: str | None = None) -> dict[str, Any]:
    """A source model as provenance records it: where it was, which registry key, the sha256 of its weights."""
    digest, _ = weights_digest(model)
    source: dict[str, Any] = {"path": str(model.path.resolve()), "sha256": digest}
    if key:
        source["key"] = key
    return source


def make_provenance(operation: str, parameters: dict[str, Any], sources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "operation": operation,
        "parameters": jsonable(parameters),
        "sources": sources,
        "orion_version": __version__,
        "created_at": utc_now(),
    }


def jsonable(value: Any) -> Any:
    """Plain JSON types: what a value reads back as from metadata.json."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
