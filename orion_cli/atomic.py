"""Outputs that appear whole or not at all, and never in place of their own inputs.

Producing commands build into a temporary sibling of the final path and rename
it into place at the end, so an interrupted or failed run never leaves half an
output, and a replaced output (--force) is swapped only once the new one is done.
Everything a run creates on the way (the temporary sibling, missing parent
folders) is removed again when it fails, and what it leaves follows the umask
like any file the user creates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OrionError, OutputExistsError, UsageError

TMP_PREFIX = ".orion-tmp-"
_UMASK_LOCK = threading.Lock()


class OutputPermissionError(OrionError):
    """The output's folder cannot be written."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def check_output(path: str | Path, force: bool, inputs: Iterable[tuple[str, str | Path]] = (),
                 flag: str = "--output") -> None:
    """Fail fast, before any work, when `path` cannot be a fresh output.

    Refused whatever --force says: an output that is, contains or lies inside one
    of `inputs` (pairs of the flag that named it and its path; symlinks resolved),
    and an output under a regular file. Refused without --force: an existing output.
    """
    final = Path(path).absolute()
    target = final.resolve()
    for input_flag, input_path in inputs:
        source = Path(input_path).absolute().resolve()
        if target == source:
            raise UsageError(f"{flag} {path}: is {input_flag} {input_path} itself; write the output elsewhere")
        if source in target.parents:
            raise UsageError(f"{flag} {path}: lies inside {input_flag} {input_path}; write the output elsewhere")
        if target in source.parents:
            raise UsageError(f"{flag} {path}: contains {input_flag} {input_path}, which --force would delete; "
                             "write the output elsewhere")
    ancestor = final.parent
    while not ancestor.exists():
        if os.path.lexists(ancestor):  # a dangling symlink
            raise UsageError(f"{flag} {path}: {ancestor} is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPermissionError(f"{flag} {path}: permission denied (cannot create anything in {ancestor})")
    if os.path.lexists(final) and not force:
        raise OutputExistsError(f"{flag} {path} already exists; pass --force to replace it")


# Kept for callers that have no inputs to protect.
def check_output_free(path: Path, force: bool, flag: str = "--output") -> None:
    check_output(path, force, (), flag)


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, force: bool = False, flag: str = "--output",
                      inputs: Iterable[tuple[str, str | Path]] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling of `path`; on success it becomes `path`.

    On any exception the temporary directory, and any parent folder this call
    created, are removed, and `path` is untouched.
    """
    final = Path(path).absolute()
    check_output(final, force, inputs, flag)
    created = _make_parents(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    except PermissionError:
        _remove_created(created)
        raise OutputPermissionError(f"{flag} {path}: permission denied (cannot create anything in {final.parent})") from None
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 is for while it is being built
        _replace_dir(tmp, final, force, flag)
    except PermissionError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        where = exc.filename if exc.filename and not str(exc.filename).startswith(str(tmp)) else final
        raise OutputPermissionError(f"{flag} {path}: permission denied writing {where}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return those created, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return missing


def _remove_created(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; only while empty, so nothing anyone else put there goes
        try:
            folder.rmdir()
        except OSError:
            return


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
    """Write a file through a temporary sibling, fsync it, and rename it into place.

    The file keeps the mode of the one it replaces, or follows the umask when new.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
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
