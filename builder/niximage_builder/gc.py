"""Garbage collection of storage (``niximage gc``), and the protocol that lets it run while
images are being built. Imports digest, errors, result, units, the storage interface and the
filesystem backend (the GCS backend only when it is already loaded).

What is kept (mark):

- every manifest a tag names (any key under ``tags/``), and what it references: its config and
  layers, or for an index (OCI index, Docker manifest list) its manifests, recursively;
- every *recent* successful build result ``builds/<key>``, one whose manifest blob was written
  or touched within the grace period: its manifest, config and layers;
- every digest a live lease names (``gc/leases/<id>``: a build in progress);
- every blob younger than the grace period, referenced or not.

What goes (sweep), in this order, so that a name goes before what it names:

1. ``builds/<key>`` successes that are not recent and whose manifest no tag or lease reaches.
   Failures stay: they hold no blobs, carry no timestamp, and tell the operator not to retry.
2. Blobs that are not marked and older than the grace period.
3. ``layers/<key>`` entries whose blob is gone (a cache: a wrong deletion costs a repack).
4. Expired leases, and temporary uploads older than the grace period (crashed writers).

``--dry-run`` marks and lists what the sweep would delete, deleting nothing.

The protocol
============

Two primitives per backend (``touch_blob``, ``delete_blob_if_stale``; proposed for
``base.Storage``), atomic with respect to each other:

- *touch(d)* sets d's modification time to now, or answers "missing". Filesystem: ``utime``
  under a shared ``flock`` of the blob file, after checking that the path still names the
  locked file. GCS: rewrite the object onto itself (a new generation, ``updated`` = now).
- *delete_if_stale(d, cutoff)* deletes d only if its mtime is older than ``cutoff``.
  Filesystem: exclusive ``flock``, check, rename into ``tmp/``, check that the renamed file is
  the one checked (else put it back), unlink. GCS: read generation and ``updated``, then delete
  with ``ifGenerationMatch``: a touch in between made a new generation, and the delete fails.

Rules for writers (``build.py`` follows them):

- W1 A build takes a lease before it reuses or writes a blob, adds each digest as it relies on
  it, flushes within a second, refreshes every ttl/4, and deletes the lease when done.
- W2 Reusing a blob means touching it; "missing" means packing it again.
- W3 After writing config and manifest, the build touches every blob the manifest names and
  packs or puts again whatever is missing, until a pass finds everything; then it records
  ``builds/<key>`` and returns.
- W4 ``cached_result`` touches the blobs of the result it returns. ``record_tag`` touches them
  after writing the tag, the manifest first; if one is missing it fails, and puts the old
  value back only after touching that image too (while the tag named the new image, the old
  one was unreferenced), else deletes the tag.

Rules for gc:

- G1 List blobs, then read the roots (tags, builds, leases). Before each deletion, if the last
  root read *started* more than grace/2 ago (monotonic clock), read them again and mark again;
  a read that itself outlasts grace/2 aborts the run.
- G2 Delete a blob only if the latest marking does not reach it, and only through
  delete_if_stale with ``cutoff = now - grace`` taken after the G1 check.
- G3 Any error reading a root or a manifest aborts the run: it is never taken for "no
  references".

Assumption A: gc's clock and the clock that stamps mtimes (the kernel; GCS's servers) agree to
well within grace/2.

Claim 1: once ``record_tag`` (tag → m) returned, every blob of m's image exists for as long
as the tag names m. record_tag wrote the tag at W, then touched m at P_m, then each other blob
d at P_d ≥ P_m, all successfully. Suppose one of them is deleted after its touch; take the
earliest such deletion, of d by a gc run G. By atomicity G's check came after P_d and saw
mtime ≥ P_d; it deleted, so P_d < cutoff = now - grace, and by G1 the root read R behind the
deletion started after now - grace/2, so W ≤ P_m ≤ P_d < R. G read the tag and found m; m
existed when G read it after R (it existed at P_m, and any later deletion of m would be an
earlier one than d's), so G read it (G3: an error aborts) and marked d: G2 forbids the
deletion. (m is touched first for exactly this step; manifests are immutable, so reading a
cached parse is as good, and a "missing" answer is never cached.)

Claim 2: a result that ``build_image`` or ``cached_result`` returns names only blobs that
exist, and no gc deletes any of them within the grace period after that (long enough for the
caller to write a tag, and ``record_tag`` checks again). The last pass of W3 (or W4's touch)
touched each blob at P with it present; a later deletion needs a check that sees mtime < now -
grace, i.e. comes more than grace after P; an earlier one would have made the touch fail.

Orderings of a build B and a gc G, and what makes each safe:

1. G reads leases after B's lease listed d: d is marked, nothing of B is deleted.
2. G read leases before B's lease and deletes d (an old layer of an image whose tag was
   deleted) before B touches it: B's touch says missing, B packs d again. The new file or
   object is fresh, and G's earlier check does not cover it (new inode, new generation).
3. B touches d between G's check and G's delete: the primitives are atomic (the flock, the
   generation precondition): d stays.
4. B touched d before G's check: d is fresh, and G spares it.
5. B wrote or touched d more than the grace period ago and its lease expired or was never read
   (B paused): G may delete d. B's verify (W3), after the manifest is written and before
   anything durable names it, finds d missing and packs or puts it again.
6. G deletes d after B's verify: not within the grace period (4, 3); after that the result is
   tagged (claim 1) or it is the old, untagged garbage gc exists for, and ``cached_result``
   touches and checks again before anyone reuses it.
7. The caller tags a result more than the grace period after the build (ordering 6 took a
   blob): ``record_tag``'s touch fails, and it puts the old value back only after touching
   that image whole: while the tag named the new image, the old one was garbage too.

So leases are not needed for safety: they spare long builds (longer than the grace period)
the repacking of step 5, and they keep a build's blobs out of ``--dry-run`` listings.

Limits, said plainly:

- GCS: the server must honour ``ifGenerationMatch`` on DELETE. Google Cloud Storage does;
  fake-gcs-server before fsouza/fake-gcs-server#2343 ignores it, so there ordering 3 can lose
  a blob touched in that window of one request. On such a server the tests skip the test of
  the primitive and, elsewhere, make touch and delete exclusive in-process instead.
- Filesystem: a blob file the builder may not ``utime`` (another user's) keeps its mtime, and
  claim 1 does not hold for it (only leases and verify protect it): run builders and gc as
  the user that owns the store. A gc killed between its rename and its unlink
  leaves ``tmp/gc-*``; the next run restores such a file if it is fresh and deletes it if not.
- Temporary uploads older than the grace period are deleted, so the grace period must exceed
  the longest single blob upload; a killed upload fails its build, it never becomes a blob.
- Tag writers that bypass ``record_tag`` (the on-demand registry, tagging a result another
  request built a moment ago) rely on that build's verify being seconds old.
- Touching on GCS makes a new object generation: a bucket with object versioning keeps the old
  ones (give it a lifecycle rule for noncurrent versions).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from niximage_builder.digest import Digest
from niximage_builder.errors import InvalidInput, NixImageError, NotFound, StorageError
from niximage_builder.result import BuildResult
from niximage_builder.storage.base import Storage, check_key
from niximage_builder.storage.filesystem import FilesystemStorage
from niximage_builder.units import format_bytes, format_duration, parse_duration

log = logging.getLogger(__name__)

DEFAULT_GRACE = 3600.0
LEASE_PREFIX = "gc/leases/"
LEASE_TTL = 600.0
"""Seconds a lease counts after its last refresh (refreshed every quarter of that)."""
LEASE_FLUSH = 1.0
"""Seconds between writes of a lease that gained digests (GCS allows ~1 write/s/object)."""
MANIFEST_LIMIT = 4 << 20
"""A blob larger than this is never read as a manifest (it is a layer)."""
READERS = 16
"""Metadata objects read at once (GCS round trips dominate)."""
TRASH_PREFIX = "gc-"
"""Filesystem: a blob being deleted is renamed to ``tmp/gc-<hex>.<random>`` first."""
_TOUCH_KEY = "niximage-touched"


class GraceTooShort(StorageError):
    """Reading the roots took longer than half the grace period (rule G1): gc stops."""


# --- test hooks -----------------------------------------------------------------------------

Checkpoint = Callable[[str, Mapping[str, Any]], None]
CHECKPOINT: Checkpoint | None = None
"""Called at the protocol's decision points (tests pause threads here to force orderings)."""


def checkpoint(name: str, **info: Any) -> None:
    hook = CHECKPOINT
    if hook is not None:
        hook(name, info)


# --- backend primitives ---------------------------------------------------------------------


def touch_blob(storage: Storage, digest: Digest) -> int | None:
    """Refresh the blob's mtime to now (atomic w.r.t. ``delete_blob_if_stale``); its size, or
    None when it does not exist."""
    own = getattr(storage, "touch_blob", None)
    if own is not None:  # a backend that implements the primitive itself
        return own(digest)  # type: ignore[no-any-return]
    if isinstance(storage, FilesystemStorage):
        return _fs_touch(storage, digest)
    gcs = _gcs_module()
    if gcs is not None and isinstance(storage, gcs.GcsStorage):
        return _gcs_touch(storage, digest)
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
        return _fs_delete_if_stale(storage, digest, cutoff)
    gcs = _gcs_module()
    if gcs is not None and isinstance(storage, gcs.GcsStorage):
        return _gcs_delete_if_stale(storage, digest, cutoff)
    raise StorageError(f"gc does not know how to delete safely from {storage!r}")


def blob_mtime(storage: Storage, digest: Digest) -> float | None:
    """The blob's current modification time, or None when it does not exist."""
    if isinstance(storage, FilesystemStorage):
        try:
            return _fs_blob_path(storage, digest).stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat blob {digest}: {exc.strerror}") from exc
    gcs = _gcs_module()
    if gcs is not None and isinstance(storage, gcs.GcsStorage):
        blob = storage._get(storage._blob_for(digest).name)
        if blob is None:
            return None
        return blob.updated.timestamp() if blob.updated else 0.0
    for listed, _size, mtime in storage.list_blobs():
        if listed == digest:
            return mtime
    return None


def count_stale_uploads(storage: Storage, older_than: float) -> int:
    """Temporary uploads (crashed writers) older than ``older_than`` seconds, for dry runs."""
    cutoff = time.time() - older_than
    if isinstance(storage, FilesystemStorage):
        with contextlib.suppress(FileNotFoundError):
            return sum(1 for _name, mtime in _fs_temp_files(storage) if mtime < cutoff)
        return 0
    gcs = _gcs_module()
    if gcs is not None and isinstance(storage, gcs.GcsStorage):
        return sum(1 for _obj in _gcs_stale_uploads(storage, cutoff))
    return 0


def purge_stale_uploads(storage: Storage, older_than: float) -> int:
    purge = getattr(storage, "purge_stale_uploads", None)
    return int(purge(older_than)) if purge is not None else 0


def _gcs_module() -> Any:
    """The GCS backend module if loaded: a GcsStorage can only exist once it is, and
    filesystem users never import the Google libraries."""
    return sys.modules.get("niximage_builder.storage.gcs")


# filesystem


def _fs_blob_path(storage: FilesystemStorage, digest: Digest) -> Path:
    return storage.root / "blobs" / "sha256" / digest.hex


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _fs_touch(storage: FilesystemStorage, digest: Digest) -> int | None:
    path = _fs_blob_path(storage, digest)
    # A few rounds: a writer may replace the file (same content) while we look at it.
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            locked = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                return None  # gc deleted it between our open and our lock
            if not _same_file(locked, current):
                continue  # replaced by a new copy: touch that one
            try:
                os.utime(fd)
            except PermissionError:
                log.debug("cannot refresh the mtime of %s (not ours)", path)
            return locked.st_size
        except OSError as exc:
            raise StorageError(f"cannot touch {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
    return storage.blob_size(digest)


def _fs_delete_if_stale(storage: FilesystemStorage, digest: Digest, cutoff: float) -> str:
    path = _fs_blob_path(storage, digest)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        # Exclusive: no touch runs between our check and our rename.
        fcntl.flock(fd, fcntl.LOCK_EX)
        locked = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            return "missing"
        if not _same_file(locked, current):
            return "fresh"  # a writer just published a new copy
        if locked.st_mtime >= cutoff:
            return "fresh"
        checkpoint("gc.delete-checked", digest=digest)
        trash = storage.root / "tmp" / f"{TRASH_PREFIX}{digest.hex}.{uuid.uuid4().hex[:12]}"
        os.rename(path, trash)
        try:
            moved = os.stat(trash)
        except FileNotFoundError:
            return "deleted"  # another gc's purge took the stale file already
        if not _same_file(moved, locked):
            # A writer replaced the blob between our check and the rename (os.replace does
            # not take our lock): that copy is fresh, put it back.
            _fs_restore(trash, path)
            return "fresh"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trash)
        return "deleted"
    except OSError as exc:
        raise StorageError(f"cannot delete {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _fs_restore(trash: Path, path: Path) -> None:
    # Published again meanwhile (FileExistsError): the same content is there already.
    # Another gc restoring the same file (FileNotFoundError): it is back.
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.link(trash, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(trash)


def _fs_temp_files(storage: FilesystemStorage) -> Iterator[tuple[Path, float]]:
    for entry in os.scandir(storage.root / "tmp"):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file(follow_symlinks=False):
                yield Path(entry.path), entry.stat().st_mtime


def recover_trash(storage: Storage, cutoff: float) -> int:
    """Filesystem: finish what a killed gc left in ``tmp/gc-*``; blobs put back, counted."""
    if not isinstance(storage, FilesystemStorage):
        return 0
    restored = 0
    with contextlib.suppress(FileNotFoundError):
        for path, mtime in list(_fs_temp_files(storage)):
            if not path.name.startswith(TRASH_PREFIX):
                continue
            hex_ = path.name[len(TRASH_PREFIX) :].split(".", 1)[0]
            restored += _fs_recover_one(storage, path, Digest(hex_), mtime >= cutoff)
    return restored


def _fs_recover_one(storage: FilesystemStorage, trash: Path, digest: Digest, fresh: bool) -> int:
    try:
        fd = os.open(trash, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        try:
            # A running gc holds this lock while it decides: leave its file alone.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        if fresh:  # only a fresh copy is ever moved aside by mistake
            with contextlib.suppress(FileNotFoundError):
                _fs_restore(trash, _fs_blob_path(storage, digest))
                return 1
            return 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trash)
        return 0
    finally:
        os.close(fd)


# GCS (the backend's private helpers: these belong in GcsStorage, see the report)


def _gcs_touch(storage: Any, digest: Digest) -> int | None:
    gcs = _gcs_module()
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
    except gcs.api_exceptions.NotFound:
        return None
    except gcs._LIBRARY_ERRORS as exc:
        where = storage._where(f"blobs/sha256/{digest.hex}")
        raise StorageError(f"GCS: touching {where} failed: {gcs._describe(exc)}") from exc


def _gcs_delete_if_stale(storage: Any, digest: Digest, cutoff: float) -> str:
    gcs = _gcs_module()
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
    except gcs.api_exceptions.PreconditionFailed:
        return "fresh"
    except gcs.api_exceptions.NotFound:
        return "missing"
    except gcs._LIBRARY_ERRORS as exc:
        where = f"gs://{blob.bucket.name}/{name}"
        raise StorageError(f"GCS: deleting {where} failed: {gcs._describe(exc)}") from exc
    return "deleted"


def _gcs_stale_uploads(storage: Any, cutoff: float) -> Iterator[Any]:
    for blob in storage._iter_objects(storage._names + "uploads/", None):
        created = blob.time_created or blob.updated
        if created is not None and created.timestamp() < cutoff:
            yield blob


# --- leases ---------------------------------------------------------------------------------


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
    """An in-flight build's lease ``gc/leases/<id>`` (rule W1 of the module doc).

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
    for key, raw in _read_all(storage, storage.list(LEASE_PREFIX)).items():
        if raw is None:
            continue  # released meanwhile
        try:
            records.append(LeaseRecord.parse(key, raw))
        except ValueError:
            broken.append(key)
    return records, broken


# --- marking --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobInfo:
    size: int
    mtime: float


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


def read_roots(storage: Storage) -> Roots:
    started = time.monotonic()
    invalid: list[str] = []
    tags: dict[str, Digest] = {}
    for key, raw in _read_all(storage, storage.list("tags/")).items():
        if raw is None:
            continue  # deleted meanwhile
        try:
            tags[key] = Digest.parse(raw.decode().strip())
        except (UnicodeDecodeError, InvalidInput):
            invalid.append(key)
    builds: dict[str, BuildResult] = {}
    for key, raw in _read_all(storage, storage.list("builds/")).items():
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
    return Roots(started, tags, builds, leases, broken, invalid)


def result_digests(result: BuildResult) -> list[Digest]:
    """The blobs a successful result names: manifest, config, layers."""
    named = [result.manifestDigest, result.configDigest, *(layer.digest for layer in result.layers)]
    return [Digest.parse(d) for d in named if d]


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
            found = _parallel(lambda d: self.references(d, _size(sizes, d)), ordered)
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


# --- the collection -------------------------------------------------------------------------


@dataclass
class Report:
    storage: str
    dry_run: bool
    grace: float
    tags: int = 0
    recent_builds: int = 0
    live_leases: int = 0
    blobs_total: int = 0
    bytes_total: int = 0
    reachable: int = 0
    reachable_bytes: int = 0
    blobs: dict[Digest, int] = field(default_factory=dict)
    """Deleted (or, in a dry run, to delete): digest → size."""
    spared: list[Digest] = field(default_factory=list)
    """Candidates kept after all: touched or referenced while gc ran."""
    builds: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    uploads: int = 0
    restored: int = 0
    dangling: list[str] = field(default_factory=list)
    """Tags and recent results that name a blob that does not exist."""
    invalid: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(self.blobs.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "dryRun": self.dry_run,
            "graceSeconds": self.grace,
            "roots": {
                "tags": self.tags,
                "recentBuilds": self.recent_builds,
                "liveLeases": self.live_leases,
            },
            "blobsTotal": self.blobs_total,
            "bytesTotal": self.bytes_total,
            "reachable": {"blobs": self.reachable, "bytes": self.reachable_bytes},
            "blobs": [{"digest": str(d), "size": s} for d, s in sorted(self.blobs.items())],
            "bytes": self.bytes,
            "spared": sorted(str(d) for d in self.spared),
            "builds": self.builds,
            "layers": self.layers,
            "leases": self.leases,
            "uploads": self.uploads,
            "restored": self.restored,
            "dangling": self.dangling,
            "invalid": self.invalid,
            "seconds": round(self.seconds, 3),
        }

    def render(self, verbose: bool = False) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = [
            f"storage {self.storage}: {self.blobs_total} blobs, {format_bytes(self.bytes_total)}"
            f" (grace {format_duration(self.grace)}{', dry run' if self.dry_run else ''})",
            f"kept: {self.reachable} reachable blobs ({format_bytes(self.reachable_bytes)}) from "
            f"{self.tags} tags, {self.recent_builds} recent builds, {self.live_leases} leases",
            f"{verb}: {len(self.blobs)} blobs ({format_bytes(self.bytes)}), "
            f"{len(self.builds)} build results, {len(self.layers)} layer entries, "
            f"{len(self.leases)} expired leases, {self.uploads} stale uploads",
        ]
        if self.spared:
            lines.append(f"spared: {len(self.spared)} blobs touched or referenced meanwhile")
        if verbose or self.dry_run:
            lines += [f"  {d}  {format_bytes(s)}" for d, s in sorted(self.blobs.items())]
            lines += [f"  {key}" for key in self.builds]
        lines += [f"warning: {what}" for what in self.dangling]
        return "\n".join(lines)


class _Collector:
    """One gc run: the state that rule G1 keeps fresh."""

    def __init__(self, storage: Storage, grace: float, report: Report) -> None:
        self.storage = storage
        self.grace = grace
        self.report = report
        self.marker = Marker(storage)
        self.blobs: dict[Digest, BlobInfo] = {}
        self.roots: Roots
        self.reachable: set[Digest] = set()
        self.recent: set[str] = set()
        self.lease_keys: set[str] = set()
        self._refreshing = threading.Lock()

    # mark

    def list_blobs(self) -> None:
        self.blobs = {d: BlobInfo(size, mtime) for d, size, mtime in self.storage.list_blobs()}
        checkpoint("gc.listed", count=len(self.blobs))

    def mark(self) -> None:
        """Read the roots (G1) and mark everything they reach."""
        self.roots = read_roots(self.storage)
        now = time.time()
        cutoff = now - self.grace
        manifests: list[Digest] = list(self.roots.tags.values())
        blobs: list[Digest] = []
        self.recent = set()
        for key, result in self.roots.builds.items():
            manifest, *named = result_digests(result)
            if self._recent(manifest, cutoff):
                self.recent.add(key)
                manifests.append(manifest)
                blobs.extend(named)
        live = [lease for lease in self.roots.leases if lease.live(now)]
        for lease in live:
            blobs.extend(lease.digests)
        self.lease_keys = {lease.key for lease in live}
        self.reachable, missing = self.marker.mark(manifests, blobs, self.blobs)
        self._report_roots(live, missing)
        checkpoint("gc.marked", reachable=len(self.reachable))

    def _recent(self, manifest: Digest, cutoff: float) -> bool:
        info = self.blobs.get(manifest)
        if info is not None:
            return info.mtime >= cutoff
        # Not listed: written after our listing (fresh), or gone.
        return self.storage.blob_size(manifest) is not None

    def _report_roots(self, live: list[LeaseRecord], missing: set[Digest]) -> None:
        report = self.report
        report.tags = len(self.roots.tags)
        report.recent_builds = len(self.recent)
        report.live_leases = len(live)
        report.invalid = sorted(self.roots.invalid + self.roots.broken_leases)
        report.dangling = sorted(
            [f"{key} names missing {d}" for key, d in self.roots.tags.items() if d in missing]
            + [f"{key}: {problem}" for key, problem in self._broken_images()]
            + [
                f"{key} names missing {d}"
                for key in self.recent
                for d in result_digests(self.roots.builds[key])[:1]
                if d in missing
            ]
        )
        listed = [self.blobs[d] for d in self.reachable if d in self.blobs]
        report.reachable = len(listed)
        report.reachable_bytes = sum(info.size for info in listed)

    def _broken_images(self) -> Iterator[tuple[str, str]]:
        """Tags whose manifest exists but names a blob that does not (a diagnostic)."""
        for key, manifest in sorted(self.roots.tags.items()):
            refs = self.marker.references(manifest)  # cached by the marking
            for digest in refs.blobs if refs is not None else ():
                if digest not in self.blobs and self.storage.blob_size(digest) is None:
                    yield key, f"{manifest} names missing {digest}"

    def refresh_if_due(self) -> None:
        """G1: the root read behind any deletion started less than grace/2 ago."""
        if time.monotonic() - self.roots.started <= self.grace / 2:
            return
        self.mark()
        checkpoint("gc.refreshed")
        if time.monotonic() - self.roots.started > self.grace / 2:
            raise GraceTooShort(
                f"reading the roots took longer than half the grace period "
                f"({format_duration(self.grace)}): use a longer --grace"
            )

    # plan

    def candidates(self) -> dict[Digest, int]:
        cutoff = time.time() - self.grace
        return {
            d: info.size
            for d, info in sorted(self.blobs.items())
            if d not in self.reachable and info.mtime < cutoff
        }

    def old_builds(self) -> list[str]:
        cutoff = time.time() - self.grace
        old = []
        for key, result in sorted(self.roots.builds.items()):
            manifest = Digest.parse(result.manifestDigest or "")
            if key in self.recent or manifest in self.reachable:
                continue
            info = self.blobs.get(manifest)
            if info is None or info.mtime < cutoff:
                old.append(key)
        return old

    def dead_layer_entries(self, doomed: Mapping[Digest, int]) -> list[str]:
        """``layers/`` entries whose blob is doomed, missing or unreadable."""
        dead = []
        for key, raw in sorted(_read_all(self.storage, self.storage.list("layers/")).items()):
            digest = _layer_digest(raw) if raw is not None else None
            if digest is None or digest in doomed or digest not in self.blobs:
                dead.append(key)
        return dead

    def expired_leases(self) -> list[str]:
        now = time.time()
        expired = [lease.key for lease in self.roots.leases if not lease.live(now)]
        return sorted(expired + self.roots.broken_leases)

    # sweep

    def delete_builds(self, keys: list[str]) -> list[str]:
        deleted = []
        for key in keys:
            checkpoint("gc.delete-build", key=key)
            self.refresh_if_due()
            raw = self.storage.read(key)
            if raw is None:
                continue
            try:
                result = BuildResult.from_json(raw)
                manifest = result_digests(result)[0]
            except (ValueError, InvalidInput, IndexError):
                continue
            if not self._still_old(key, result, manifest):
                continue
            self.storage.delete(key)
            deleted.append(key)
        return deleted

    def _still_old(self, key: str, result: BuildResult, manifest: Digest) -> bool:
        """Re-check just before deleting: rewritten, referenced or touched since the plan?"""
        if result != self.roots.builds.get(key) or manifest in self.reachable:
            return False
        mtime = blob_mtime(self.storage, manifest)
        return mtime is None or mtime < time.time() - self.grace

    def delete_blobs(self, doomed: Mapping[Digest, int]) -> dict[Digest, int]:
        """Delete in parallel (GCS round trips); each deletion follows G1 and G2 itself."""
        with ThreadPoolExecutor(READERS) as pool:
            outcomes = list(pool.map(self._delete_blob, doomed))
        deleted: dict[Digest, int] = {}
        for (digest, size), outcome in zip(doomed.items(), outcomes, strict=True):
            if outcome == "deleted":
                deleted[digest] = size
            elif outcome == "fresh":
                self.report.spared.append(digest)
        return deleted

    def _delete_blob(self, digest: Digest) -> str:
        checkpoint("gc.before-delete", digest=digest)
        with self._refreshing:
            self.refresh_if_due()
            if digest in self.reachable:
                return "fresh"
            # G2: the cutoff is taken right after the G1 check (the delete's own latency does
            # not matter: the primitive is atomic).
            cutoff = time.time() - self.grace
        outcome = delete_blob_if_stale(self.storage, digest, cutoff)
        checkpoint("gc.after-delete", digest=digest, outcome=outcome)
        return outcome

    def delete_layer_entries(self, keys: list[str]) -> list[str]:
        with ThreadPoolExecutor(READERS) as pool:
            done = list(pool.map(self._delete_layer_entry, keys))
        return [key for key, deleted in zip(keys, done, strict=True) if deleted]

    def _delete_layer_entry(self, key: str) -> bool:
        raw = self.storage.read(key)
        if raw is None:
            return False
        digest = _layer_digest(raw)
        # Only if its blob is gone now: a builder may have packed it again meanwhile.
        if digest is not None and self.storage.blob_size(digest) is not None:
            return False
        self.storage.delete(key)
        return True


def _layer_digest(raw: bytes) -> Digest | None:
    try:
        return Digest.parse(json.loads(raw)["digest"])
    except (ValueError, KeyError, TypeError, InvalidInput):
        return None


def _read_all(storage: Storage, keys: Iterable[str]) -> dict[str, bytes | None]:
    """Read metadata objects in parallel; errors propagate (rule G3)."""
    keys = list(keys)
    return dict(zip(keys, _parallel(storage.read, keys), strict=True))


def _parallel(function: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``map`` over a few threads: storage round trips dominate; errors propagate."""
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(READERS, len(items))) as pool:
        return list(pool.map(function, items))


def collect(storage: Storage, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> Report:
    """One gc run over ``storage`` (see the module doc); a dry run deletes nothing."""
    if grace <= 0:
        raise InvalidInput("the grace period must be positive")
    started = time.monotonic()
    report = Report(storage.url, dry_run, grace)
    run = _Collector(storage, grace, report)
    if not dry_run:
        report.restored = recover_trash(storage, time.time() - grace)
    run.list_blobs()
    report.blobs_total = len(run.blobs)
    report.bytes_total = sum(info.size for info in run.blobs.values())
    run.mark()
    doomed = run.candidates()
    old_builds = run.old_builds()
    expired = run.expired_leases()
    if dry_run:
        report.blobs = doomed
        report.builds = old_builds
        report.layers = run.dead_layer_entries(doomed)
        report.leases = expired
        report.uploads = count_stale_uploads(storage, grace)
    else:
        report.builds = run.delete_builds(old_builds)
        report.blobs = run.delete_blobs(doomed)
        report.layers = run.delete_layer_entries(run.dead_layer_entries(report.blobs))
        for key in expired:
            storage.delete(key)
        report.leases = expired
        report.uploads = purge_stale_uploads(storage, grace)
    report.seconds = time.monotonic() - started
    return report


# --- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, default_storage: str | None = None) -> None:
    """``niximage gc`` flags; wire with ``parser.set_defaults(run=gc.run)``."""
    parser.add_argument(
        "--storage",
        default=default_storage or os.environ.get("NIXIMAGE_STORAGE", ".niximage"),
        help="DIR or gs://BUCKET[/PREFIX]",
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    parser.add_argument(
        "--grace",
        type=_duration_argument,
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="keep unreferenced blobs younger than this (default 1h; e.g. 30m, 2h, 7d)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every deleted blob")


def _duration_argument(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the grace period must be positive")
    return seconds


def run(args: argparse.Namespace) -> int:
    """``niximage gc``: collect, then print the report (JSON with ``--json``)."""
    from niximage_builder.storage import factory  # entry point only: keeps gc importable alone

    store = factory.open_storage(args.storage)
    try:
        report = collect(store, args.grace, args.dry_run)
    finally:
        store.close()
    for problem in report.dangling:
        print(f"niximage gc: warning: {problem}", file=sys.stderr)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.render(args.verbose))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m niximage_builder.gc`` (the same as ``niximage gc``)."""
    parser = argparse.ArgumentParser(
        prog="niximage gc", description="delete unreferenced blobs and cache entries"
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except NixImageError as exc:
        print(f"niximage gc: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1


if __name__ == "__main__":
    sys.exit(main())
