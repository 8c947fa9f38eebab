"""The primitives of the protocol on one blob, dispatched to the storage that implements them
(``storage.base.Collectable``): ``touch_blob`` and ``delete_blob_if_stale`` (atomic with
respect to each other), ``blob_mtime``, the temporary uploads of crashed writers, and the
recovery of deletions a killed gc left half done. Builders use ``touch_all`` and
``touch_image``. A storage without the primitives gets a ``StorageError``, never a weaker
answer.

Imports digest, errors, the storage interface, reading and marking.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from niximage_builder.digest import Digest
from niximage_builder.errors import StorageError
from niximage_builder.gc.marking import Marker
from niximage_builder.gc.reading import READERS
from niximage_builder.storage.base import Collectable, Storage


def _collectable(storage: Storage, primitive: str) -> Collectable:
    """``storage``, once it is known to implement ``primitive`` (a ``Collectable`` method)."""
    if not hasattr(storage, primitive):  # cheaper than isinstance with a Protocol, per blob
        raise StorageError(
            f"gc cannot work on {storage!r}: it implements no {primitive} "
            "(the primitives of storage.base.Collectable)"
        )
    return cast(Collectable, storage)


def touch_blob(storage: Storage, digest: Digest) -> int | None:
    """Refresh the blob's mtime to now (atomic w.r.t. ``delete_blob_if_stale``); its size, or
    None when it does not exist."""
    return _collectable(storage, "touch_blob").touch_blob(digest)


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
    return _collectable(storage, "delete_blob_if_stale").delete_blob_if_stale(digest, cutoff)


def blob_mtime(storage: Storage, digest: Digest) -> float | None:
    """The blob's current modification time, or None when it does not exist."""
    return _collectable(storage, "blob_mtime").blob_mtime(digest)


def count_stale_uploads(storage: Storage, older_than: float) -> int:
    """Temporary uploads (crashed writers) older than ``older_than`` seconds, for dry runs."""
    return _collectable(storage, "count_stale_uploads").count_stale_uploads(older_than)


def purge_stale_uploads(storage: Storage, older_than: float) -> int:
    """Delete the temporary uploads older than ``older_than`` seconds; how many went."""
    return _collectable(storage, "purge_stale_uploads").purge_stale_uploads(older_than)


def recover_trash(storage: Storage, cutoff: float) -> int:
    """Settle the deletions a killed gc left half done; the blobs put back (fresh ones)."""
    return _collectable(storage, "recover_trash").recover_trash(cutoff)
