"""python -m orion_cli.reference [--cache-dir DIR] [--force]: build (or find) the cached reference model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import load_config
from .model import ensure_reference_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or find) the cached reference model and print its directory.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the orion cache directory")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached copy exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir = args.cache_dir or load_config().cache_path
    print(ensure_reference_model(cache_dir, force=args.force))


main()
