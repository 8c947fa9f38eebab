"""Where a layer's files come from: this machine's Nix store, or a binary cache's NARs.

``LocalStore`` scans store paths that Nix realised here. ``CacheContents`` fetches the NAR of
each path that is not here from the cache whose narinfo was verified, streams it once into
a spool file (checking the NAR's size and hash against the signed narinfo before a single
entry is handed out) and gives the same entries a scan of the realised path would, so a
layer's bytes do not depend on where its files came from. A spool is removed once its
layer is packed; the listing (names and kinds, no contents) stays for the top layer.

Imports tarball, toplayer's listing type and binarycache; writes only to its spool folder.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from niximage_builder import tarball, toplayer
from niximage_builder.binarycache.nar import read_nar
from niximage_builder.tarball import Entry
from niximage_core.errors import SubstituteError

if TYPE_CHECKING:  # the HTTP client is imported only where caches are used
    from niximage_builder.binarycache.closure import Substitutable


@dataclass
class Downloads:
    """What one build fetched from the caches."""

    nars: int = 0
    nar_bytes: int = 0
    """Bytes of the NARs, uncompressed."""
    file_bytes: int = 0
    """Bytes as served (compressed)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nar_bytes: int, file_bytes: int) -> None:
        with self._lock:
            self.nars += 1
            self.nar_bytes += nar_bytes
            self.file_bytes += file_bytes


class Contents(Protocol):
    def entries(self, paths: Sequence[str]) -> list[Entry]:
        """The normalised entries of a layer of these store paths."""
        ...

    def listing(self, root: str) -> Sequence[Entry]:
        """One store path's own entries (``toplayer.Listing``)."""
        ...

    def release(self, paths: Sequence[str]) -> None:
        """The layer of ``paths`` is packed: what was kept for its contents can go."""
        ...


class LocalStore:
    """Store paths valid in this machine's store."""

    def entries(self, paths: Sequence[str]) -> list[Entry]:
        return tarball.scan_paths(paths)

    def listing(self, root: str) -> Sequence[Entry]:
        return toplayer.local_listing(root)

    def release(self, paths: Sequence[str]) -> None:
        pass


class CacheContents:
    """Paths in ``remote`` come from their caches' NARs, the others from ``local``."""

    def __init__(
        self,
        remote: Mapping[str, Substitutable],
        local: Contents | None = None,
        spool_dir: str | None = None,
    ) -> None:
        self._remote = remote
        self._local = local or LocalStore()
        self._dir = tempfile.mkdtemp(prefix="niximage-nar-", dir=spool_dir)
        self.downloads = Downloads()
        self._listings: dict[str, list[Entry]] = {}
        self._spooled: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> CacheContents:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def entries(self, paths: Sequence[str]) -> list[Entry]:
        local = [path for path in paths if path not in self._remote]
        if len(local) == len(paths):
            return self._local.entries(local)  # already normalised
        found = self._local.entries(local) if local else []
        for path in paths:
            if path in self._remote:
                found.extend(self._fetch(path, contents=True))
        return tarball.normalize(found)

    def listing(self, root: str) -> Sequence[Entry]:
        if root not in self._remote:
            return self._local.listing(root)
        return self._fetch(root, contents=False)

    def release(self, paths: Sequence[str]) -> None:
        for path in paths:
            with self._lock(path):
                if path in self._spooled:
                    self._spooled.discard(path)
                    os.unlink(self._spool_path(path))

    def _lock(self, path: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(path, threading.Lock())

    def _spool_path(self, path: str) -> str:
        return os.path.join(self._dir, path.rpartition("/")[2] + ".nar")

    def _fetch(self, path: str, contents: bool) -> list[Entry]:
        """The path's entries; with ``contents`` its spool must exist too (fetched again only
        if a packed layer released it and a repack after a racing gc needs it)."""
        with self._lock(path):
            known = self._listings.get(path)
            if known is not None and (path in self._spooled or not contents):
                return known
            source = self._remote[path]
            spool_path = self._spool_path(path)
            size = source.info.nar_size
            served = functools.partial(self.downloads.add, size)
            try:
                with (
                    open(spool_path, "wb") as spool,
                    source.cache.nar(source.info, served) as stream,
                ):
                    listing = read_nar(stream, path, spool, spool_path, size)
                    if listing.nar_hash != source.info.nar_hash:
                        raise SubstituteError(
                            "CorruptCache",
                            f"{path} from {source.cache.url}: the NAR's sha256 is not the "
                            "signed NarHash (the file in the cache was altered or damaged)",
                        )
            except BaseException:
                os.unlink(spool_path)
                raise
            # Kept even when only the names were wanted (the top layer): the root's own
            # layer may need the contents next, and must not download the NAR again.
            self._listings[path] = listing.entries
            self._spooled.add(path)
            return listing.entries
