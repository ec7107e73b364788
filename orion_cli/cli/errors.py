"""One table from exceptions to one-line messages and exit codes."""

from __future__ import annotations

import errno
import json
import sys
import traceback

from ..errors import EXIT_FAILURE, EXIT_INTERRUPTED, OrionError


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an exception that reached the CLI."""
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
        return "out of memory; for quantize try --low-cpu-mem, for serve a larger --tp", EXIT_FAILURE
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {first_line} (run with --verbose for the traceback)", EXIT_FAILURE


def report(exc: BaseException, verbose: bool, json_output: bool) -> int:
    message, code = describe(exc)
    if verbose and not isinstance(exc, KeyboardInterrupt):
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"orion: error: {message}\n")
    if json_output:
        document = {"error": {"message": message, "type": type(exc).__name__, "exit_code": code}}
        sys.stdout.write(json.dumps(document) + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    return code
