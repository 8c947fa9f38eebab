"""The primitives of the protocol on one blob, whatever the backend: ``touch_blob`` and
``delete_blob_if_stale`` (atomic with respect to each other), ``blob_mtime``, and the
temporary uploads of crashed writers. Builders use ``touch_all`` and ``touch_image``.

A backend that implements a primitive itself (``storage.touch_blob``) is asked first; then
the filesystem and GCS ones of this package; an unknown backend gets the weakest safe answer.

Imports digest, errors, the storage interface, reading, filesystem, gcs and marking.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from niximage_builder.digest import Digest
from niximage_builder.errors import StorageError
from niximage_builder.gc import filesystem, gcs
from niximage_builder.gc.marking import Marker
from niximage_builder.gc.reading import READERS
from niximage_builder.storage.base import Storage
from niximage_builder.storage.filesystem import FilesystemStorage


def touch_blob(storage: Storage, digest: Digest) -> int | None:
    """Refresh the blob's mtime to now (atomic w.r.t. ``delete_blob_if_stale``); its size, or
    None when it does not exist."""
    own = getattr(storage, "touch_blob", None)
    if own is not None:  # a backend that implements the primitive itself
        return own(digest)  # type: ignore[no-any-return]
    if isinstance(storage, FilesystemStorage):
        return filesystem.touch_blob(storage, digest)
    if gcs.is_gcs(storage):
        return gcs.touch_blob(storage, digest)
    # Unknown backend: existence only; safety then rests on leases and verification.
    return storage.blob_size(digest)


def touch_all(storage: Storage, digests: Iterable[Digest]) -> list[Digest]:
    """Touch every blob (in parallel); the digests that were missing, in the given order."""
    unique = list(dict.fromkeys(digests))
    if len(unique) <= 1:
        sizes = [touch_blob(storage, d) for d in unique]
    else:
        with ThreadPoolExecutor(min(READERS, len(unique))) as pool:
            sizes = list(pool.map(lambda d: touch_blob(storage, d), unique))
    return [d for d, size in zip(unique, sizes, strict=True) if size is None]


def touch_image(storage: Storage, manifest: Digest) -> list[Digest]:
    """Touch a manifest, then what it names (an index's manifests, recursively): the
    missing blobs. The manifest goes first, as claim 1 needs."""
    if touch_blob(storage, manifest) is None:
        return [manifest]
    refs = Marker(storage).references(manifest)
    if refs is None:
        return [manifest]
    missing = touch_all(storage, refs.blobs)
    for nested in refs.manifests:
        missing += touch_image(storage, nested)
    return missing


def delete_blob_if_stale(storage: Storage, digest: Digest, cutoff: float) -> str:
    """Delete the blob unless it was modified (touched, written) at or after ``cutoff``.

    ``"deleted"``, ``"fresh"`` (kept) or ``"missing"``.
    """
    own = getattr(storage, "delete_blob_if_stale", None)
    if own is not None:
        return str(own(digest, cutoff))
    if isinstance(storage, FilesystemStorage):
        return filesystem.delete_blob_if_stale(storage, digest, cutoff)
    if gcs.is_gcs(storage):
        return gcs.delete_blob_if_stale(storage, digest, cutoff)
    raise StorageError(f"gc does not know how to delete safely from {storage!r}")


def blob_mtime(storage: Storage, digest: Digest) -> float | None:
    """The blob's current modification time, or None when it does not exist."""
    if isinstance(storage, FilesystemStorage):
        return filesystem.blob_mtime(storage, digest)
    if gcs.is_gcs(storage):
        return gcs.blob_mtime(storage, digest)
    for listed, _size, mtime in storage.list_blobs():
        if listed == digest:
            return mtime
    return None


def count_stale_uploads(storage: Storage, older_than: float) -> int:
    """Temporary uploads (crashed writers) older than ``older_than`` seconds, for dry runs."""
    cutoff = time.time() - older_than
    if isinstance(storage, FilesystemStorage):
        with contextlib.suppress(FileNotFoundError):
            return sum(1 for _name, mtime in filesystem.temp_files(storage) if mtime < cutoff)
        return 0
    if gcs.is_gcs(storage):
        return sum(1 for _obj in gcs.stale_uploads(storage, cutoff))
    return 0


def purge_stale_uploads(storage: Storage, older_than: float) -> int:
    purge = getattr(storage, "purge_stale_uploads", None)
    return int(purge(older_than)) if purge is not None else 0
