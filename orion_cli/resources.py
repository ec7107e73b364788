"""Files shipped beside the code: the registry schema and the default configs.

They live at the repository root (models.schema.json, configs/); a wheel carries
copies under orion_cli/_data (see pyproject.toml). A source checkout or an
editable install has no _data folder and reads the root copies.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_CANDIDATES = (_PACKAGE_DIR / "_data", _PACKAGE_DIR.parent)


def resource_path(name: str) -> Path:
    """Path of a shipped file, e.g. 'models.schema.json' or 'configs/default.yaml'."""
    for root in _CANDIDATES:
        path = root / name
        if path.exists():
            return path
    raise FileNotFoundError(f"orion is installed without its data file {name}; reinstall the package")


def configs_dir() -> Path:
    return resource_path("configs")
