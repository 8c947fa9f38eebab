"""Writing into a filesystem store: a temporary file in ``tmp/`` that is published by
``rename`` (``TempFile``), and the blob writer built on it (``FileBlobWriter``).

The file is fsynced, renamed into place (same filesystem: atomic), and the directory fsynced:
a reader sees either the old object or the complete new one, and a crash leaves at most a
stray file in ``tmp/`` (``FilesystemStorage.purge_stale_uploads``). A delete prunes the
directories it empties, so the target's directory may vanish before the rename: it is made
again (the caller's ``make_parent``) and the rename retried.

Imports digest, errors and threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from niximage_core.digest import Digest
from niximage_core.errors import StorageError
from niximage_core.threads import process_pool

log = logging.getLogger(__name__)

# Readable by a registry that runs as another user; mkstemp would leave 0600.
_FILE_MODE = 0o644

WRITEBACK_BYTES = 32 << 20
"""Every this many bytes, a big file is made durable so far by a background ``fdatasync``,
so that the fsync at publish finds little left: a layer of hundreds of MB reaches the disk
while it is still being packed, not after it (330 MB here: 0.68 s of fsync at the end,
0.02 s with this)."""

DIRECTORY_ATTEMPTS = 10
"""Times a writer makes a directory that concurrent deletes keep pruning, before failing:
each retry needs another delete to empty and remove it in between, so a few suffice."""


class TempFile:
    """A file in ``tmp/`` that is either published (renamed into place) or discarded."""

    def __init__(self, tmp_dir: Path, prefix: str) -> None:
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=tmp_dir)
        except OSError as exc:
            raise error("create a temporary file in", tmp_dir, exc) from exc
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._open = True  # until published or discarded
        self._unsynced = 0
        self._syncing: Future[None] | None = None

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
            self._unsynced += len(data)
            if self._unsynced >= WRITEBACK_BYTES and (
                self._syncing is None or self._syncing.done()
            ):
                self._sync_in_background()
        except OSError as exc:
            raise error("write", self.path, exc) from exc

    def _sync_in_background(self) -> None:
        self._wait_for_sync()  # done already: only its error, if any, is raised here
        self._file.flush()
        self._unsynced = 0
        self._syncing = process_pool("niximage-writeback", 1).submit(
            os.fdatasync, self._file.fileno()
        )

    def _wait_for_sync(self) -> None:
        if self._syncing is not None:
            syncing, self._syncing = self._syncing, None
            syncing.result()

    def publish(self, final: Path, make_parent: Callable[[], None] | None = None) -> None:
        """Make the content durable, then atomically rename it to ``final`` (durably too).

        ``make_parent`` creates ``final``'s directory again when it vanished (a concurrent
        delete pruned it, empty, after the caller made it); without it, that is an error.
        """
        try:
            self._wait_for_sync()
            self._file.flush()
            os.fchmod(self._file.fileno(), _FILE_MODE)
            os.fsync(self._file.fileno())
            self._file.close()
            self._rename(final, make_parent)
        except OSError as exc:
            raise error("publish", final, exc) from exc
        # From here the name in tmp/ may belong to another writer: never unlink it again.
        self._open = False
        try:
            fsync_dir(final.parent)
        except FileNotFoundError:
            # Pruned since, so emptied first: a later delete took our file, nothing to sync.
            pass
        except OSError as exc:
            raise error("sync directory", final.parent, exc) from exc

    def _rename(self, final: Path, make_parent: Callable[[], None] | None) -> None:
        for _ in range(DIRECTORY_ATTEMPTS - 1):
            try:
                # Replacing an existing blob is fine: same content (and a fresh mtime for gc).
                os.replace(self.path, final)
                return
            except FileNotFoundError:
                # Our own file gone (purged as stale) is no race: only a missing directory is.
                if make_parent is None or not self.path.exists():
                    raise
            make_parent()
        os.replace(self.path, final)

    def discard(self) -> None:
        """Remove the file unless published; safe to call at any time, never raises."""
        if not self._open:
            return
        self._open = False
        # A full disk can fail the final flush; the file goes anyway.
        with contextlib.suppress(OSError):
            self._wait_for_sync()  # never close the descriptor under a running fdatasync
        with contextlib.suppress(OSError):
            self._file.close()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # left for purge_stale_uploads; never hide the caller's error
            log.warning("cannot remove temporary file %s: %s", self.path, exc)


class FileBlobWriter:
    """Streams into a temp file while hashing; ``commit`` verifies and renames into place."""

    def __init__(self, tmp_dir: Path, blobs_dir: Path) -> None:
        self._blobs = blobs_dir
        self._tmp = TempFile(tmp_dir, "blob-")
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        self._check_open()
        self._tmp.write(data)
        self._hash.update(data)
        self._size += len(data)

    def digest(self) -> Digest:
        return Digest(self._hash.hexdigest())

    def commit(self, expected: Digest) -> None:
        self._check_open()
        actual = self.digest()
        if actual != expected:
            self.discard()
            raise StorageError(
                f"digest mismatch: expected {expected}, the {self._size} bytes written hash to "
                f"{actual}; blob not stored"
            )
        self._tmp.publish(self._blobs / expected.hex)
        self._done = True

    def discard(self) -> None:
        self._done = True
        self._tmp.discard()

    def _check_open(self) -> None:
        if self._done:
            raise ValueError("blob writer is already committed or discarded")


def error(action: str, path: Path, exc: OSError) -> StorageError:
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
