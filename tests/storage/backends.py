"""Backends under test, with raw access to what they wrote (for leftover checks)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from niximage_core.storage.filesystem import FilesystemStorage

# Small chunks make the resumable path run in small tests.
GCS_CHUNK = 1 << 20


@dataclass
class Backend:
    """A storage under test plus raw access to what it put where."""

    name: str
    storage: Any  # a Storage, plus the backend's extras (blob_file, signed_blob_url, ...)
    temp_prefix: str  # where unfinished writes live: "tmp/" or "uploads/"
    raw_names: Callable[[], list[str]]  # every file/object under the storage root, sorted
    plant: Callable[[str, bytes], None]  # write a raw file/object (a crashed writer's debris)


def fast_retry(timeout: float = 10) -> Any:
    """The library's retry policy with a short deadline, so failing tests fail fast."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(timeout).with_delay(initial=0.05, maximum=0.5)


def make_gcs_storage(client: Any, bucket: str, prefix: str = "", **kwargs: Any) -> Any:
    from niximage_core.storage.gcs import GcsStorage

    kwargs.setdefault("retry", fast_retry())
    kwargs.setdefault("chunk_size", GCS_CHUNK)
    return GcsStorage(bucket, prefix, client, **kwargs)


def filesystem_backend(root: Path) -> Backend:
    storage = FilesystemStorage(root)

    def raw_names() -> list[str]:
        found = (Path(d, f) for d, _, files in os.walk(root) for f in files)
        return sorted(path.relative_to(root).as_posix() for path in found)

    def plant(name: str, data: bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backend("filesystem", storage, "tmp/", raw_names, plant)


def gcs_backend(client: Any, bucket: str, prefix: str = "") -> Backend:
    storage = make_gcs_storage(client, bucket, prefix)
    names = f"{prefix}/" if prefix else ""

    def raw_names() -> list[str]:
        return sorted(b.name[len(names) :] for b in client.list_blobs(bucket, prefix=names))

    def plant(name: str, data: bytes) -> None:
        client.bucket(bucket).blob(names + name).upload_from_string(data)

    return Backend("gcs", storage, "uploads/", raw_names, plant)
