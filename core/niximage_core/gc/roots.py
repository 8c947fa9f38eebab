"""What gc keeps, and how it reads storage (rule G1): tags, successful build results, and
leases ``gc/leases/<id>``, the digests an in-flight build relies on (rule W1; ``Lease``
writes and refreshes one for a build). Storage round trips go a few at a time:
``parallel`` maps over up to ``READERS`` threads, ``read_all`` reads metadata objects that
way. Errors propagate (rule G3: an unreadable root is never taken for "no references").

Imports digest, errors, result, referrers and the storage interface.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from niximage_core import referrers
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_core.result import BuildResult
from niximage_core.storage.base import Storage, check_key

# ---- reading -------------------------------------------------------------------------

READERS = 16
"""Metadata objects read at once (GCS round trips dominate)."""


def read_all(storage: Storage, keys: Iterable[str]) -> dict[str, bytes | None]:
    """Read metadata objects in parallel; errors propagate (rule G3)."""
    keys = list(keys)
    return dict(zip(keys, parallel(storage.read, keys), strict=True))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def parallel(function: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``map`` over ``READERS`` threads: storage round trips dominate; errors propagate.

    One pool for the process (a pool per call cost a thread start per round trip on the
    operator's hot path), so ``function`` must be a leaf: one storage call that never calls
    ``parallel`` itself, or a nested call could wait for its own pool.
    """
    global _pool
    if len(items) <= 1:
        return [function(item) for item in items]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READERS, thread_name_prefix="niximage-storage-io")
    return list(_pool.map(function, items))


# ---- leases --------------------------------------------------------------------------

log = logging.getLogger(__name__)


LEASE_PREFIX = "gc/leases/"
LEASE_TTL = 600.0
"""Seconds a lease counts after its last refresh (refreshed every quarter of that)."""
LEASE_FLUSH = 1.0
"""Seconds between writes of a lease that gained digests (GCS allows ~1 write/s/object)."""


@dataclass(frozen=True)
class LeaseRecord:
    """A lease as stored: the digests an in-flight build depends on."""

    key: str
    owner: str
    purpose: str
    refreshed: float
    ttl: float
    digests: frozenset[Digest]

    def live(self, now: float) -> bool:
        return now - self.refreshed <= self.ttl

    @classmethod
    def parse(cls, key: str, raw: bytes) -> LeaseRecord:
        try:
            doc = json.loads(raw)
            return cls(
                key=key,
                owner=str(doc.get("owner", "")),
                purpose=str(doc.get("purpose", "")),
                refreshed=float(doc["refreshed"]),
                ttl=float(doc["ttl"]),
                digests=frozenset(Digest.parse(d) for d in doc.get("digests", [])),
            )
        except (ValueError, KeyError, TypeError, AttributeError, InvalidInput) as exc:
            raise ValueError(f"malformed lease {key}") from exc


class Lease:
    """An in-flight build's lease ``gc/leases/<id>`` (rule W1 of the package doc).

    ``with Lease(storage, "build <key>") as lease:`` writes it at once, then a thread writes it
    again within ``flush`` seconds of ``add`` and every ``ttl/4`` seconds; leaving the block
    deletes it. Failures after the first write are logged: leases spare work, safety does not
    depend on them.
    """

    def __init__(
        self, storage: Storage, purpose: str, ttl: float | None = None, flush: float | None = None
    ) -> None:
        self.storage = storage
        self.purpose = purpose
        self.ttl = LEASE_TTL if ttl is None else ttl
        self.flush_interval = LEASE_FLUSH if flush is None else flush
        self.key = check_key(f"{LEASE_PREFIX}{uuid.uuid4().hex}")
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._digests: set[Digest] = set()
        self._dirty = False
        self._written = 0.0  # monotonic time of the last write
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.flush(force=True)
        self._thread = threading.Thread(target=self._run, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def add(self, *digests: Digest) -> None:
        with self._lock:
            new = set(digests) - self._digests
            if new:
                self._digests |= new
                self._dirty = True

    @property
    def digests(self) -> frozenset[Digest]:
        with self._lock:
            return frozenset(self._digests)

    def flush(self, force: bool = False) -> None:
        """Write the lease now if it gained digests (or always, with ``force``)."""
        with self._write_lock:
            with self._lock:
                if not (force or self._dirty):
                    return
                self._dirty = False
                doc = {
                    "owner": self.owner,
                    "purpose": self.purpose,
                    "refreshed": time.time(),
                    "ttl": self.ttl,
                    "digests": sorted(str(d) for d in self._digests),
                }
            self.storage.write(self.key, json.dumps(doc, sort_keys=True).encode())
            self._written = time.monotonic()

    def release(self) -> None:
        """Stop refreshing and delete the lease; never raises."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            with self._write_lock:
                self.storage.delete(self.key)
        except Exception as exc:  # an expired lease is harmless; the build's error matters
            log.warning("cannot delete lease %s: %s", self.key, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                stale = time.monotonic() - self._written > self.ttl / 4
                self.flush(force=stale)
            except Exception as exc:
                log.warning("cannot write lease %s: %s", self.key, exc)


def read_leases(storage: Storage) -> tuple[list[LeaseRecord], list[str]]:
    """Every lease, and the keys of unreadable ones."""
    records, broken = [], []
    for key, raw in read_all(storage, storage.list(LEASE_PREFIX)).items():
        if raw is None:
            continue  # released meanwhile
        try:
            records.append(LeaseRecord.parse(key, raw))
        except ValueError:
            broken.append(key)
    return records, broken


# ---- roots ---------------------------------------------------------------------------


@dataclass
class Roots:
    """What references blobs, as read at ``started`` (monotonic)."""

    started: float
    tags: dict[str, Digest]
    builds: dict[str, BuildResult]
    """Successful results, by key."""
    leases: list[LeaseRecord]
    broken_leases: list[str]
    invalid: list[str] = field(default_factory=list)
    """Tags and build results that could not be parsed (kept, reported)."""
    referrers: dict[Digest, list[Digest]] = field(default_factory=dict)
    """Subject manifest → the artifacts about it (``referrers/``): kept while it is."""


def read_roots(storage: Storage) -> Roots:
    started = time.monotonic()
    invalid: list[str] = []
    tags: dict[str, Digest] = {}
    for key, raw in read_all(storage, storage.list("tags/")).items():
        if raw is None:
            continue  # deleted meanwhile
        try:
            tags[key] = Digest.parse(raw.decode().strip())
        except (UnicodeDecodeError, InvalidInput):
            invalid.append(key)
    builds: dict[str, BuildResult] = {}
    for key, raw in read_all(storage, storage.list("builds/")).items():
        if raw is None:
            continue
        try:
            result = BuildResult.from_json(raw)
        except ValueError:
            invalid.append(key)
            continue
        if not result.ok or not result.manifestDigest:
            continue  # failures name no blobs
        try:
            result_digests(result)
        except InvalidInput:
            invalid.append(key)
            continue
        builds[key] = result
    leases, broken = read_leases(storage)
    links = referrers.all_links(storage)
    return Roots(started, tags, builds, leases, broken, invalid, links)


def result_digests(result: BuildResult) -> list[Digest]:
    """The blobs a successful result names: manifest, config, layers, then its referrers'
    manifests and blobs (the SBOM); for an image index, the index, then each platform's
    manifest, config, layers and referrers."""
    named = [result.manifestDigest, result.configDigest, *(layer.digest for layer in result.layers)]
    named += [d for ref in result.referrers for d in (ref.manifestDigest, *ref.blobs)]
    for platform in result.platforms:
        named += [platform.manifestDigest, platform.configDigest, *platform.layers]
        named += [d for ref in platform.referrers for d in (ref.manifestDigest, *ref.blobs)]
    return [Digest.parse(d) for d in named if d]
