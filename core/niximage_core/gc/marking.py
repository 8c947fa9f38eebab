"""Reachability and the primitives on one blob.

What a manifest names (``manifest_references``), and the ``Marker`` that follows manifests
from the roots, level by level, reading only manifests. Then the protocol's primitives on
one blob (``storage.base.Storage``'s gc part): ``touch_blob`` and ``delete_blob_if_stale``
(atomic with respect to each other), ``blob_mtime``, the temporary uploads of crashed
writers, and the recovery of deletions a killed gc left half done. Builders use
``touch_all`` and ``touch_image``.

Imports digest, errors, the storage interface and roots (for reading in parallel).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NotFound
from niximage_core.gc.roots import parallel
from niximage_core.storage.base import Storage

MANIFEST_LIMIT = 4 << 20
"""A blob larger than this is never read as a manifest (it is a layer)."""


@dataclass(frozen=True)
class BlobInfo:
    size: int
    mtime: float


@dataclass(frozen=True)
class References:
    """What a manifest names: nested manifests (an index's), and blobs never read (config,
    layers)."""

    manifests: tuple[Digest, ...] = ()
    blobs: tuple[Digest, ...] = ()


class Marker:
    """Reachability from roots. Only manifests are read, level by level in parallel; they are
    immutable, so their parse is cached (a "missing" answer is not: a build may put the
    manifest back before the next marking)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._parsed: dict[Digest, References] = {}

    def references(self, digest: Digest, size: int | None = None) -> References | None:
        """What a manifest or index names; empty for other blobs, None when missing."""
        found = self._parsed.get(digest)
        if found is None:
            found = self._read(digest, size)
            if found is not None:
                self._parsed[digest] = found
        return found

    def _read(self, digest: Digest, size: int | None) -> References | None:
        if size is not None and size > MANIFEST_LIMIT:
            return References()
        try:
            with self.storage.open_blob(digest) as stream:
                data = stream.read(MANIFEST_LIMIT + 1)
        except NotFound:
            return None
        return References() if len(data) > MANIFEST_LIMIT else manifest_references(data)

    def mark(
        self,
        manifests: Iterable[Digest],
        blobs: Iterable[Digest],
        sizes: Mapping[Digest, BlobInfo],
        referrers: Mapping[Digest, Iterable[Digest]] | None = None,
    ) -> tuple[set[Digest], set[Digest]]:
        """Every digest reachable from the roots, and the manifests among them that are
        missing. ``blobs`` are roots that are never read (leased digests, layers); a
        reachable manifest's ``referrers`` (its SBOM) are reachable manifests too."""
        referrers = referrers or {}
        reachable = set(blobs)
        missing: set[Digest] = set()
        seen: set[Digest] = set()
        level = set(manifests)
        while level:
            seen |= level
            ordered = sorted(level)
            found = parallel(lambda d: self.references(d, _size(sizes, d)), ordered)
            level = set()
            for digest, refs in zip(ordered, found, strict=True):
                reachable.add(digest)
                if refs is None:
                    missing.add(digest)
                    continue
                reachable.update(refs.blobs)
                level.update(d for d in refs.manifests if d not in seen)
                level.update(d for d in referrers.get(digest, ()) if d not in seen)
        return reachable, missing


def _size(sizes: Mapping[Digest, BlobInfo], digest: Digest) -> int | None:
    info = sizes.get(digest)
    return info.size if info is not None else None


def manifest_references(data: bytes) -> References:
    """What an image manifest (config, layers) or index (manifests) names; nothing for bytes
    that are not such JSON (a config, a layer)."""
    if not data.startswith(b"{"):
        return References()
    try:
        doc = json.loads(data)
    except ValueError:
        return References()
    if not isinstance(doc, dict):
        return References()
    blobs = [doc.get("config"), *_list(doc.get("layers"))]
    return References(_digests(_list(doc.get("manifests"))), _digests(blobs))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _digests(descriptors: Iterable[Any]) -> tuple[Digest, ...]:
    found = []
    for descriptor in descriptors:
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if isinstance(digest, str):
            with contextlib.suppress(InvalidInput):
                found.append(Digest.parse(digest))
    return tuple(found)


# ---- the primitives on one blob ---------------------------------------------------------


def touch_blob(storage: Storage, digest: Digest) -> int | None:
    """Refresh the blob's mtime to now (atomic w.r.t. ``delete_blob_if_stale``); its size, or
    None when it does not exist."""
    return storage.touch_blob(digest)


def touch_all(storage: Storage, digests: Iterable[Digest]) -> list[Digest]:
    """Touch every blob (in parallel); the digests that were missing, in the given order."""
    unique = list(dict.fromkeys(digests))
    sizes = parallel(storage.touch_blob, unique)
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
