"""Model references in a mergekit configuration, and the configuration's validation.

mergekit reads a model string as a hub name unless it is a path that exists;
every reference orion hands it is the absolute path of a local directory, so
neither its loader nor its model-card writer ever looks a name up on the hub.
"""

from __future__ import annotations

from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

# Keys of a mergekit YAML whose string values name models ("union" and "base" are tokenizer modes).
_MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")
_NOT_MODELS = ("union", "base")
# Characters mergekit reads inside a model string: '+' joins a LoRA, '@' a hub revision.
_SPECIAL_IN_REFS = ("+", "@", '"', " ")


def mergekit_version() -> str:
    return package_version("mergekit")


def model_ref(path: Path) -> str | dict[str, Any]:
    """A model reference mergekit reads back as exactly this path."""
    text = str(path)
    if any(ch in text for ch in _SPECIAL_IN_REFS):
        return {"model": {"path": text}}
    return text


def map_model_refs(node: Any, fn: Callable[[str, str, bool], Any], where: str = "") -> Any:
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
                mapped[key] = map_model_refs(value, fn, here)
        return mapped
    if isinstance(node, list):
        return [map_model_refs(value, fn, f"{where}[{index}]") for index, value in enumerate(node)]
    return node


def validated(data: dict[str, Any], where: str):
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
            f"mergekit {mergekit_version()} has {', '.join(sorted(REGISTERED_MERGE_METHODS))}"
        )
    return config
