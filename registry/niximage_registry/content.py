"""What the registry reads from storage, behind small caches, off the event loop.

Storage calls are blocking (files, GCS over HTTP), so each runs in a dedicated thread pool,
never the loop and never the build pool. Three caches keep storage out of the hot path of a
pull (a kubelet asks for the same manifest by tag and then by digest, nodes pull in waves):

- tag → digest, for ``tag_ttl`` seconds (default 1 s): a moved tag is seen within that
  time, in every replica, with no invalidation protocol. Concurrent lookups of one tag
  share one storage read (``SingleFlight``), also with the cache off (``tag_ttl`` 0): an
  answer is then never older than the read in flight when the request came;
- digest → manifest bytes (and media type), verified once against the digest: content
  addressed, so immutable; bounded in bytes and kept ``manifest_ttl`` seconds so that a
  manifest removed by garbage collection stops being served;
- repository → exists, for ``repository_ttl`` seconds (positive answers only: a new
  repository is seen at once);
- repository → what it may serve (``serves``): the manifests its tags name and its revision
  links (``niximage_core.revisions``) name, and what those reference, for
  ``repository_ttl`` seconds; a digest not in it makes one recomputation, at most every
  ``tag_ttl`` seconds, so a new tag is seen as fast as the tag itself and random digests
  cannot make every request walk the repository.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, BinaryIO, Generic, TypeVar

from niximage_core import layout, manifest, referrers, revisions
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NotFound, StorageError
from niximage_core.gc.marking import manifest_references
from niximage_core.storage.base import Storage
from niximage_registry.errors import Code, RegistryError

log = logging.getLogger(__name__)

MAX_MANIFEST = 4 * 1024 * 1024
"""Bigger blobs are never manifests (containerd refuses > ~4.4 MB): not read into memory."""

READINESS_KEY = "registry/readiness"
"""Read (never written) by the readiness probe: a miss is as good an answer as a hit."""

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class SingleFlight(Generic[K, V]):
    """One run of ``work`` per key at a time; concurrent callers await the same result.

    The run is a task of its own, so a caller that is cancelled (a client gone) stops
    waiting without cancelling it for the others."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._running[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Future[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning without waiters

    def __len__(self) -> int:
        return len(self._running)


class TtlCache(Generic[K, V]):
    """A bounded LRU whose entries expire; one event loop uses it, so no lock."""

    def __init__(
        self,
        ttl: float,
        max_entries: int,
        weigh: Callable[[V], int] | None = None,
        max_weight: int = 0,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._weigh = weigh
        self._max_weight = max_weight
        self._weight = 0
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            self.pop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        self.pop(key)
        self._items[key] = (time.monotonic() + self.ttl, value)
        self._weight += self._weigh(value) if self._weigh else 0
        while len(self._items) > self.max_entries or (
            self._weigh and self._weight > self._max_weight and len(self._items) > 1
        ):
            self.pop(next(iter(self._items)))

    def pop(self, key: K) -> None:
        item = self._items.pop(key, None)
        if item is not None and self._weigh:
            self._weight -= self._weigh(item[1])

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Manifest:
    digest: Digest
    data: bytes
    media_type: str


@dataclass
class LocalBlob:
    """An open blob file: the registry sends it with ``sendfile``."""

    file: BinaryIO
    size: int


@dataclass(frozen=True)
class Reachable:
    """The digests one repository may serve, as computed at ``at`` (monotonic)."""

    digests: frozenset[Digest]
    at: float


MAX_REACHABLE_MANIFESTS = 10_000
"""Manifests walked for one repository at most (a bound, not a limit anyone meets)."""


@dataclass(frozen=True)
class CacheSettings:
    tag_ttl: float = 1.0
    manifest_ttl: float = 300.0
    manifest_bytes: int = 64 * 1024 * 1024
    repository_ttl: float = 10.0


class Content:
    """Async, cached reads of tags, manifests, repositories and blobs."""

    def __init__(
        self,
        storage: Storage,
        executor: Executor,
        cache: CacheSettings | None = None,
        on_cache: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.storage = storage
        self._executor = executor
        cache = cache or CacheSettings()
        self._tags: TtlCache[tuple[str, str], Digest] = TtlCache(cache.tag_ttl, 100_000)
        self._manifests: TtlCache[Digest, Manifest] = TtlCache(
            cache.manifest_ttl, 100_000, lambda m: len(m.data), cache.manifest_bytes
        )
        self._repositories: TtlCache[str, bool] = TtlCache(cache.repository_ttl, 100_000)
        self._reachable: TtlCache[str, Reachable] = TtlCache(cache.repository_ttl, 10_000)
        self._walks: SingleFlight[str, Reachable] = SingleFlight()
        self._tag_reads: SingleFlight[tuple[str, str], Digest | None] = SingleFlight()
        self._refresh_after = cache.tag_ttl
        self._on_cache = on_cache or (lambda _cache, _hit: None)

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """Run a blocking storage call in the storage pool; outages become 503."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function, *args)
        except StorageError as exc:
            log.error("storage error: %s", exc)
            raise RegistryError(
                Code.UNAVAILABLE,
                "storage is unavailable; retry later",
                headers={"Retry-After": "5"},
            ) from exc

    async def storage_answers(self) -> bool:
        """Whether storage answers a read now (readiness): one small object's GET, whether
        or not it exists, within the storage's retry deadline."""
        try:
            await self.run(self.storage.read, READINESS_KEY)
        except RegistryError:
            return False
        return True

    # tags and repositories

    async def tag(self, repository: str, tag: str) -> Digest | None:
        key = (repository, tag)
        digest = self._tags.get(key)
        self._on_cache("tag", digest is not None)
        if digest is None:
            digest = await self._tag_reads.run(key, lambda: self._read_tag_once(key))
        return digest

    async def _read_tag_once(self, key: tuple[str, str]) -> Digest | None:
        digest = await self.run(self._read_tag, *key)
        if digest is not None:
            self._tags.put(key, digest)
        return digest

    def remember_tag(self, repository: str, tag: str, digest: Digest) -> None:
        """Seed the cache after this process recorded a tag (on-demand builds)."""
        self._tags.put((repository, tag), digest)
        self._repositories.put(repository, True)
        self._reachable.pop(repository)

    def _read_tag(self, repository: str, tag: str) -> Digest | None:
        try:
            return layout.read_tag(self.storage, repository, tag, with_pulls=True)
        except InvalidInput:
            log.error("tag %s:%s in %s does not hold a digest", repository, tag, self.storage.url)
            return None

    async def repository_exists(self, repository: str) -> bool:
        """A repository exists while it has at least one tag."""
        if self._repositories.get(repository):
            self._on_cache("repository", True)
            return True
        self._on_cache("repository", False)
        exists = bool(await self.run(self._list_tags, repository, 1))
        if exists:
            self._repositories.put(repository, True)
        return exists

    async def tags(self, repository: str) -> list[str]:
        return await self.run(self._list_tags, repository, None)

    def _list_tags(self, repository: str, limit: int | None) -> list[str]:
        """This repository's tags (``layout.iter_tags``): all, sorted; or the first ``limit``
        storage lists (whether it exists)."""
        if limit is None:
            return layout.list_tags(self.storage, repository)
        return list(itertools.islice(layout.iter_tags(self.storage, repository), limit))

    # what a repository serves

    async def serves(self, repository: str, digest: Digest) -> bool:
        """Whether ``digest`` (a manifest or blob) may be served under ``repository``: the
        repository's tags or revision links reach it (distribution's repository links)."""
        known = self._reachable.get(repository)
        self._on_cache("reachable", known is not None and digest in known.digests)
        fresh = known is not None and time.monotonic() - known.at < self._refresh_after
        if known is not None and (digest in known.digests or fresh):
            return digest in known.digests
        return digest in (await self._walk_once(repository)).digests

    async def _walk_once(self, repository: str) -> Reachable:
        """One walk per repository at a time; concurrent callers share it."""
        return await self._walks.run(repository, lambda: self._walk_and_remember(repository))

    async def _walk_and_remember(self, repository: str) -> Reachable:
        found = await self._walk(repository)
        self._reachable.put(repository, found)
        return found

    async def _walk(self, repository: str) -> Reachable:
        started = time.monotonic()
        pending = await self.run(self._manifest_roots, repository)
        found: set[Digest] = set()
        walked = 0
        while pending and walked < MAX_REACHABLE_MANIFESTS:
            digest = pending.pop()
            if digest in found:
                continue
            found.add(digest)
            walked += 1
            stored = await self.manifest(digest)
            if stored is None:
                continue  # garbage-collected: its link goes with the next gc
            references = manifest_references(stored.data)
            found.update(references.blobs)
            pending.extend(references.manifests)
        return Reachable(frozenset(found), started)

    def _manifest_roots(self, repository: str) -> list[Digest]:
        """The manifests the repository's tags name now, and its revision links."""
        tagged = [
            self._read_tag(repository, tag) for tag in layout.list_tags(self.storage, repository)
        ]
        linked = revisions.list_revisions(self.storage, repository)
        return list(dict.fromkeys([*(d for d in tagged if d is not None), *linked]))

    # referrers

    async def referrers(self, repository: str, subject: Digest) -> list[dict[str, Any]]:
        """The artifacts about ``subject`` that ``repository`` serves (so a client can fetch
        each one it is told of): the referrers API's descriptors."""
        if not await self.repository_exists(repository):
            return []
        found = await self.run(referrers.listed, self.storage, subject)
        return [d for d in found if await self.serves(repository, Digest.parse(d["digest"]))]

    # manifests

    async def manifest(self, digest: Digest) -> Manifest | None:
        """The stored manifest with this digest, verified; None if absent or not a manifest."""
        cached = self._manifests.get(digest)
        self._on_cache("manifest", cached is not None)
        if cached is not None:
            return cached
        found = await self.run(self._read_manifest, digest)
        if found is not None:
            self._manifests.put(digest, found)
        return found

    def _read_manifest(self, digest: Digest) -> Manifest | None:
        size = self.storage.blob_size(digest)
        if size is None or size > MAX_MANIFEST:
            return None
        try:
            with self.storage.open_blob(digest) as stream:
                data = stream.read(MAX_MANIFEST + 1)
        except NotFound:
            return None
        if Digest.of(data) != digest:
            # Never serve bytes that do not hash to the digest the client will check.
            log.error("blob %s in %s does not match its digest", digest, self.storage.url)
            raise StorageError(f"blob {digest} is corrupt")
        media_type = manifest.media_type_of(data)
        return Manifest(digest, data, media_type) if media_type else None

    # blobs

    async def blob_size(self, digest: Digest) -> int | None:
        return await self.run(self.storage.blob_size, digest)

    async def open_file(self, path: str, digest: Digest) -> LocalBlob | None:
        """The blob at ``path`` (``storage.blob_delivery``'s) as an open file, or None."""
        return await self.run(self._open_file, path, digest)

    def _open_file(self, path: str, digest: Digest) -> LocalBlob | None:
        try:
            file = open(path, "rb")  # noqa: SIM115 (closed by the response)
        except FileNotFoundError:
            return None  # garbage-collected since
        except OSError as exc:
            raise StorageError(f"cannot open blob {digest}: {exc.strerror or exc}") from exc
        return LocalBlob(file, os.fstat(file.fileno()).st_size)
