"""Outputs that appear whole or not at all.

Producing commands build into a temporary sibling of the final path and rename
it into place at the end, so an interrupted or failed run never leaves half an
output, and a replaced output (--force) is swapped only once the new one is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError

TMP_PREFIX = ".orion-tmp-"


def check_output_free(path: Path, force: bool, flag: str = "--output") -> None:
    """Fail fast, before any work, when the output exists and --force was not given."""
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{flag} {path} already exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, force: bool = False, flag: str = "--output") -> Iterator[Path]:
    """Yield an empty temporary sibling of `path`; on success it becomes `path`.

    On any exception the temporary directory is removed and `path` is untouched.
    """
    final = Path(path).absolute()
    check_output_free(final, force, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        _replace_dir(tmp, final, force, flag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, final: Path, force: bool, flag: str) -> None:
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    check_output_free(final, force, flag)  # it may have appeared while we worked
    retired = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-old-", dir=final.parent))
    retired_final = retired / final.name
    os.rename(final, retired_final)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(retired_final, final)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary sibling, fsync it, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
