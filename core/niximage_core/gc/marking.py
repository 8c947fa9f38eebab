"""Reachability: what a manifest names (``manifest_references``), and the ``Marker`` that
follows manifests from the roots, level by level, reading only manifests.

Imports digest, errors, the storage interface and reading.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NotFound
from niximage_core.gc.reading import parallel
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
        self, manifests: Iterable[Digest], blobs: Iterable[Digest], sizes: Mapping[Digest, BlobInfo]
    ) -> tuple[set[Digest], set[Digest]]:
        """Every digest reachable from the roots, and the manifests among them that are
        missing. ``blobs`` are roots that are never read (leased digests, layers)."""
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
