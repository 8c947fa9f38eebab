"""The two primitives on Google Cloud Storage, and its stale uploads.

``touch_blob`` rewrites the object onto itself (a new generation, ``updated`` = now);
``delete_blob_if_stale`` reads generation and ``updated``, then deletes with
``ifGenerationMatch``: a touch in between made a new generation, and the delete fails. They
use the backend's private helpers: these belong in ``GcsStorage``.

Imports digest, errors and hooks. The GCS backend (and with it the Google libraries) only
through ``loaded()``, once something else has imported it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

from niximage_builder.digest import Digest
from niximage_builder.errors import StorageError
from niximage_builder.gc.hooks import checkpoint
from niximage_builder.storage.base import Storage

_TOUCH_KEY = "niximage-touched"


def loaded() -> Any:
    """The GCS backend module if loaded: a GcsStorage can only exist once it is, and
    filesystem users never import the Google libraries."""
    return sys.modules.get("niximage_builder.storage.gcs")


def is_gcs(storage: Storage) -> bool:
    backend = loaded()
    return backend is not None and isinstance(storage, backend.GcsStorage)


def touch_blob(storage: Any, digest: Digest) -> int | None:
    backend = loaded()
    source = storage._blob_for(digest)
    target = storage._blob_for(digest)
    # A rewrite onto itself that changes metadata: allowed, atomic, a new generation.
    target.metadata = {_TOUCH_KEY: f"{time.time():.3f}"}
    target.content_type = "application/octet-stream"
    token: str | None = None
    try:
        while True:
            token, _done, size = target.rewrite(source, token=token, retry=storage.retry)
            if token is None:
                return int(target.size if target.size is not None else size)
    except backend.api_exceptions.NotFound:
        return None
    except backend._LIBRARY_ERRORS as exc:
        where = storage._where(f"blobs/sha256/{digest.hex}")
        raise StorageError(f"GCS: touching {where} failed: {backend._describe(exc)}") from exc


def delete_blob_if_stale(storage: Any, digest: Digest, cutoff: float) -> str:
    backend = loaded()
    name = storage._blob_for(digest).name
    blob = storage._get(name)
    if blob is None:
        return "missing"
    if blob.updated is None or blob.updated.timestamp() >= cutoff:
        return "fresh"
    checkpoint("gc.delete-checked", digest=digest)
    try:
        # Only this generation: a touch since our read made a new one, and this fails.
        blob.delete(if_generation_match=blob.generation, retry=storage.retry)
    except backend.api_exceptions.PreconditionFailed:
        return "fresh"
    except backend.api_exceptions.NotFound:
        return "missing"
    except backend._LIBRARY_ERRORS as exc:
        where = f"gs://{blob.bucket.name}/{name}"
        raise StorageError(f"GCS: deleting {where} failed: {backend._describe(exc)}") from exc
    return "deleted"


def blob_mtime(storage: Any, digest: Digest) -> float | None:
    blob = storage._get(storage._blob_for(digest).name)
    if blob is None:
        return None
    return blob.updated.timestamp() if blob.updated else 0.0


def stale_uploads(storage: Any, cutoff: float) -> Iterator[Any]:
    for blob in storage._iter_objects(storage._names + "uploads/", None):
        created = blob.time_created or blob.updated
        if created is not None and created.timestamp() < cutoff:
            yield blob
