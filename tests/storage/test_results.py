"""builds/<key>: a failure never replaces a success (two builders of one key, one of them
failing late: a transient storage error, a timeout), on both backends."""

from __future__ import annotations

from typing import Any

from niximage_core import layout
from niximage_core.result import BuildError, BuildResult

KEY = "ab" * 32


def success() -> BuildResult:
    return BuildResult(buildKey=KEY, spec={}, ok=True, manifestDigest="sha256:" + "1" * 64)


def failure() -> BuildResult:
    error = BuildError(kind="Timeout", message="Nix timed out", transient=True)
    return BuildResult(buildKey=KEY, spec={}, ok=False, error=error)


def stored(storage: Any) -> BuildResult:
    raw = storage.read(layout.build_key_path(KEY))
    assert raw is not None
    return BuildResult.from_json(raw)


def test_a_failure_never_replaces_a_success(storage: Any) -> None:
    assert layout.record_result(storage, failure())
    assert not stored(storage).ok
    assert layout.record_result(storage, success())  # a success replaces a failure
    assert not layout.record_result(storage, failure())
    assert stored(storage).ok
    assert layout.record_result(storage, success())  # and a success a success


def test_a_damaged_record_is_replaced(storage: Any) -> None:
    storage.write(layout.build_key_path(KEY), b"{not json")
    assert layout.record_result(storage, failure())
    assert stored(storage).error is not None
