"""Byte sizes as users write them: '500' (MB, as the old scripts took it), '500MB', '2GB', '1.5GiB'."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {
    "": 10**6,  # a bare number is megabytes
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """Bytes in `text`; decimal units (MB, GB) are powers of ten, binary units (MiB, GiB) powers of two."""
    if isinstance(text, int):
        text = str(text)
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"{flag} {text!r}: not a size; write e.g. 500 (MB), 500MB, 2GB or 1.5GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"{flag} {text!r}: the size must be positive")
    return size


def format_size(num_bytes: float) -> str:
    """Human-readable size in binary units, e.g. '1.50 GiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
