"""The primitives of the protocol on one blob, dispatched to the storage that implements them
(``storage.base.Storage``): ``touch_blob`` and ``delete_blob_if_stale`` (atomic with
respect to each other), ``blob_mtime``, the temporary uploads of crashed writers, and the
recovery of deletions a killed gc left half done. Builders use ``touch_all`` and
``touch_image``.

Imports digest, errors, the storage interface, reading and marking.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from niximage_core.digest import Digest
from niximage_core.gc.marking import Marker
from niximage_core.gc.reading import READERS
from niximage_core.storage.base import Storage


def touch_blob(storage: Storage, digest: Digest) -> int | None:
    """Refresh the blob's mtime to now (atomic w.r.t. ``delete_blob_if_stale``); its size, or
    None when it does not exist."""
    return storage.touch_blob(digest)


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
    return storage.delete_blob_if_stale(digest, cutoff)


def blob_mtime(storage: Storage, digest: Digest) -> float | None:
    """The blob's current modification time, or None when it does not exist."""
    return storage.blob_mtime(digest)


def count_stale_uploads(storage: Storage, older_than: float) -> int:
    """Temporary uploads (crashed writers) older than ``older_than`` seconds, for dry runs."""
    return storage.count_stale_uploads(older_than)


def purge_stale_uploads(storage: Storage, older_than: float) -> int:
    """Delete the temporary uploads older than ``older_than`` seconds; how many went."""
    return storage.purge_stale_uploads(older_than)


def recover_trash(storage: Storage, cutoff: float) -> int:
    """Settle the deletions a killed gc left half done; the blobs put back (fresh ones)."""
    return storage.recover_trash(cutoff)
