"""Durations and sizes as people write and read them (``90m``, ``1.2 GB``). Pure.

Imports errors. Shared by ``niximage gc``'s flags and report and by the operator's
settings (its garbage-collection schedule), so a duration means the same everywhere.
"""

from __future__ import annotations

import contextlib
import re

from niximage_builder.errors import InvalidInput

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1h30m`` or plain seconds → seconds."""
    value = text.strip().lower()
    with contextlib.suppress(ValueError):
        seconds = float(value)
        if seconds >= 0:
            return seconds
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not value or pos != len(value):
        raise InvalidInput(f"invalid duration {text[:50]!r}: expected e.g. 90s, 30m, 2h, 7d, 1h30m")
    return total


def format_duration(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
