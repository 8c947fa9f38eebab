"""Storage round trips a few at a time: ``parallel`` maps over up to ``READERS`` threads,
``read_all`` reads metadata objects that way. Errors propagate (rule G3: an unreadable root
is never taken for "no references").

Imports the storage interface only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from niximage_core.storage.base import Storage

READERS = 16
"""Metadata objects read at once (GCS round trips dominate)."""


def read_all(storage: Storage, keys: Iterable[str]) -> dict[str, bytes | None]:
    """Read metadata objects in parallel; errors propagate (rule G3)."""
    keys = list(keys)
    return dict(zip(keys, parallel(storage.read, keys), strict=True))


def parallel(function: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``map`` over a few threads: storage round trips dominate; errors propagate."""
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(READERS, len(items))) as pool:
        return list(pool.map(function, items))
