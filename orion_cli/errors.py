"""The OrionError family: failures a user can act on.

Every message names the file, flag or key at fault and fits on one line; the
CLI prints it without a traceback (unless --verbose) and exits with the class's
exit code. Library callers catch OrionError.
"""

from __future__ import annotations

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
