"""Durations and sizes as people write and read them (``90m``, ``1.2 GB``). Pure.

Imports errors. Shared by ``niximage gc``'s flags and report and by the operator's
settings (its garbage-collection schedule), so a duration means the same everywhere.
"""

from __future__ import annotations

import contextlib
import re

from niximage_core.errors import InvalidInput

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


def format_bytes(size: int, binary: bool = False) -> str:
    """``1.5 kB`` (powers of 1000, as gc reports), or ``1.5 KiB`` with ``binary``."""
    base, units = (1024, ("B", "KiB", "MiB", "GiB")) if binary else (1000, ("B", "kB", "MB", "GB"))
    value = float(size)
    for unit in units:
        if value < base or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= base
    raise AssertionError("unreachable")
