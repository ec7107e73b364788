"""The OrionError family: failures a user can act on.

Every message names the file, flag or key at fault and fits on one line; the
CLI prints it without a traceback (unless --verbose) and exits with the class's
exit code. Library callers catch OrionError.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class OrionError(Exception):
    """A failure with a one-line, actionable message."""

    exit_code = EXIT_FAILURE


class UsageError(OrionError):
    """Flags that parse but do not make sense together (counts, ranges, choices)."""

    exit_code = EXIT_USAGE


class ConfigError(OrionError):
    """A config file or ORION_* variable that is unreadable, unknown or of the wrong type."""

    exit_code = EXIT_USAGE


class RegistryError(OrionError):
    """models.json is missing, unreadable, invalid, locked, or lacks a key."""


class ModelDirError(OrionError):
    """A model directory without what a command needs (config.json, weights, ...)."""


class UnsupportedModelError(OrionError):
    """An architecture or file format the command does not handle."""


class OutputExistsError(OrionError):
    """An output path exists and --force was not given."""


class VerificationError(OrionError):
    """Files on disk do not match the hashes or sizes recorded for them."""


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for any exception: the table the CLI's error boundary uses."""
    if isinstance(exc, OrionError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file or directory", EXIT_FAILURE
    if isinstance(exc, PermissionError):
        return f"{exc.filename}: permission denied", EXIT_FAILURE
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"no space left on device{where}", EXIT_FAILURE
    if isinstance(exc, MemoryError):
        return "out of memory; for quantize try fewer --calibration-tokens, for serve a larger --tp", EXIT_FAILURE
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {first_line} (run with --verbose for the traceback)", EXIT_FAILURE
