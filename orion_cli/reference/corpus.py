"""An offline text corpus every machine has: the Python standard library's source.

Files are split deterministically by a hash of their relative path, so the
held-out split never overlaps training text and is the same on every machine
with the same Python release.
"""

from __future__ import annotations

import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Literal

Split = Literal["train", "heldout"]
HELDOUT_EVERY = 20  # one file in twenty is held out
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def corpus_files() -> tuple[Path, ...]:
    root = stdlib_root()
    return tuple(
        sorted(
            (p for p in root.rglob("*.py") if not _SKIP_PARTS.intersection(p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
    )


def split_of(path: Path) -> Split:
    rel = path.relative_to(stdlib_root()).as_posix()
    bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELDOUT_EVERY
    return "heldout" if bucket == 0 else "train"


def corpus_text(split: Split, max_bytes: int | None = None) -> str:
    """Concatenated source files of one split, in path order, cut at a file boundary near max_bytes."""
    parts: list[str] = []
    total = 0
    for path in corpus_files():
        if split_of(path) != split:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return "\n".join(parts)[: max_bytes if max_bytes is not None else None]


def corpus_digest() -> str:
    """Identifies the corpus: the names and sizes of its files."""
    root = stdlib_root()
    listing = "".join(f"{p.relative_to(root).as_posix()} {p.stat().st_size}\n" for p in corpus_files())
    return hashlib.sha256(listing.encode()).hexdigest()
