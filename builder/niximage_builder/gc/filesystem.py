"""The two primitives on a filesystem store, and the recovery of what a killed gc left.

``touch_blob``: ``utime`` under a shared ``flock`` of the blob file, after checking that the
path still names the locked file. ``delete_blob_if_stale``: exclusive ``flock``, check, rename
into ``tmp/gc-*``, check that the renamed file is the one checked (else put it back), unlink.
``recover_trash`` finishes such a deletion, or undoes it, after a gc was killed in between.

Imports digest, errors, the storage interface, the filesystem backend and hooks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from niximage_builder.digest import Digest
from niximage_builder.errors import StorageError
from niximage_builder.gc.hooks import checkpoint
from niximage_builder.storage.base import Storage
from niximage_builder.storage.filesystem import FilesystemStorage

log = logging.getLogger(__name__)


TRASH_PREFIX = "gc-"
"""Filesystem: a blob being deleted is renamed to ``tmp/gc-<hex>.<random>`` first."""


def blob_path(storage: FilesystemStorage, digest: Digest) -> Path:
    return storage.root / "blobs" / "sha256" / digest.hex


def blob_mtime(storage: FilesystemStorage, digest: Digest) -> float | None:
    try:
        return blob_path(storage, digest).stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot stat blob {digest}: {exc.strerror}") from exc


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def touch_blob(storage: FilesystemStorage, digest: Digest) -> int | None:
    path = blob_path(storage, digest)
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


def delete_blob_if_stale(storage: FilesystemStorage, digest: Digest, cutoff: float) -> str:
    path = blob_path(storage, digest)
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
            _restore(trash, path)
            return "fresh"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trash)
        return "deleted"
    except OSError as exc:
        raise StorageError(f"cannot delete {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _restore(trash: Path, path: Path) -> None:
    # Published again meanwhile (FileExistsError): the same content is there already.
    # Another gc restoring the same file (FileNotFoundError): it is back.
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.link(trash, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(trash)


def temp_files(storage: FilesystemStorage) -> Iterator[tuple[Path, float]]:
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
        for path, mtime in list(temp_files(storage)):
            if not path.name.startswith(TRASH_PREFIX):
                continue
            hex_ = path.name[len(TRASH_PREFIX) :].split(".", 1)[0]
            restored += _recover_one(storage, path, Digest(hex_), mtime >= cutoff)
    return restored


def _recover_one(storage: FilesystemStorage, trash: Path, digest: Digest, fresh: bool) -> int:
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
                _restore(trash, blob_path(storage, digest))
                return 1
            return 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trash)
        return 0
    finally:
        os.close(fd)
