"""One table from exceptions to one-line messages and exit codes."""

from __future__ import annotations

import json
import sys
import traceback

from ..errors import describe


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
