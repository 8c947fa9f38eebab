"""The ``Range`` request header → one byte range (RFC 9110 §14). Pure.

Single ranges only, which is what registry clients send (containerd resumes with
``bytes=<offset>-``). A server may ignore Range, so a header we do not serve as a range —
another unit, or several ranges — yields the whole blob (200). An invalid range
(``bytes=500-0``, garbage) or one that starts past the end is unsatisfiable: 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"\s*(\d{0,19})\s*-\s*(\d{0,19})\s*")


class Unsatisfiable(Exception):
    """Answer 416 with ``Content-Range: bytes */<size>``."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int
    """Inclusive, as in ``Content-Range``."""
    size: int
    """The whole blob's length."""

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def parse(header: str | None, size: int) -> ByteRange | None:
    """The range to serve, None for the whole blob; raises ``Unsatisfiable``."""
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None  # another unit: ignore the header (RFC 9110 §14.2)
    if "," in spec:
        return None  # several ranges: we may send the whole representation instead
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise Unsatisfiable(f"invalid range {header[:80]!r}")
    first, last = match.groups()
    if not first:
        if not last or int(last) == 0 or size == 0:
            raise Unsatisfiable(f"unsatisfiable suffix range {header[:80]!r}")
        suffix = min(int(last), size)
        return ByteRange(size - suffix, size - 1, size)
    start = int(first)
    if last and int(last) < start:
        raise Unsatisfiable(f"invalid range {header[:80]!r}: last byte before first")
    if start >= size:
        raise Unsatisfiable(f"range {header[:80]!r} starts past the end ({size} bytes)")
    end = min(int(last), size - 1) if last else size - 1
    return ByteRange(start, end, size)
