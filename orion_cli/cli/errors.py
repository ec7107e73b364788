"""One table from exceptions to one-line messages and exit codes, and how a failure is printed."""

from __future__ import annotations

import json
import sys
import traceback

from ..errors import EXIT_USAGE, describe


def describe_cli(exc: BaseException) -> tuple[str, int]:
    """describe(), plus click's own usage errors (unknown option, bad value, missing option)."""
    from typer._click.exceptions import UsageError as ClickUsageError

    if isinstance(exc, ClickUsageError):
        where = exc.ctx.command_path if exc.ctx is not None else "orion"
        return f"{exc.format_message()} (see '{where} --help')", EXIT_USAGE
    return describe(exc)


def report(exc: BaseException, verbose: bool, json_output: bool) -> int:
    message, code = describe_cli(exc)
    if verbose and not isinstance(exc, KeyboardInterrupt):
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"orion: error: {message}\n")
    if json_output:
        document = {"error": {"message": message, "type": type(exc).__name__, "exit_code": code}}
        sys.stdout.write(json.dumps(document) + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    return code
