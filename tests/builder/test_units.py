"""Durations and sizes: what people type, what reports print."""

from __future__ import annotations

import pytest

from niximage_core.errors import InvalidInput
from niximage_core.units import format_bytes, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("2h", 7200), ("7d", 604800), ("90s", 90), ("1h30m", 5400),
     ("2w", 1209600), ("500ms", 0.5), ("1.5s", 1.5), ("45", 45), (" 24H ", 86400)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "h", "1x", "1h 30m", "-5m", "m30", "1hh", "nan"])
def test_a_bad_duration_is_named(bad: str) -> None:
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_duration(bad)


def test_format() -> None:
    assert [format_duration(s) for s in (3600, 90, 86400, 1.5)] == ["1h", "90s", "1d", "1.5s"]
    assert [format_bytes(n) for n in (999, 1500, 2_500_000, 7_000_000_000_000)] == [
        "999 B", "1.5 kB", "2.5 MB", "7000.0 GB"
    ]  # fmt: skip
    assert [format_bytes(n, binary=True) for n in (1023, 1536, 5 << 30)] == [
        "1023 B", "1.5 KiB", "5.0 GiB"
    ]  # fmt: skip
