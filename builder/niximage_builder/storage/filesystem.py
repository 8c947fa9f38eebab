"""Storage in a local directory (DESIGN.md §3): one file per blob or metadata object.

    <root>/blobs/sha256/<hex>       committed blobs, immutable
    <root>/layers|builds|tags|gc/…  metadata objects, one file per key
    <root>/tmp/                     files being written; never listed or read

Everything is written to a temporary file in ``tmp/`` (same filesystem, so ``rename`` is
atomic), fsynced, then renamed into place and the directory fsynced: a reader sees either
the old object or the complete new one, and a crash leaves at most a stray file in ``tmp/``.
Nothing uses xattrs (tmpfs and some overlay setups have none).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from niximage_builder.digest import Digest
from niximage_builder.errors import InvalidInput, NotFound, StorageError
from niximage_builder.storage.base import check_key, check_prefix, is_key

log = logging.getLogger(__name__)

_HEX = re.compile(r"[a-f0-9]{64}")
# Readable by a registry that runs as another user; mkstemp would leave 0600.
_FILE_MODE = 0o644


class FilesystemStorage:
    """A ``Storage`` (and ``LocalBlobs``) in the directory ``root``; see the module doc."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.url = str(self.root)
        self._blobs = self.root / "blobs" / "sha256"
        self._tmp = self.root / "tmp"
        self._create_dirs()

    def _create_dirs(self) -> None:
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(exist_ok=True)
        except OSError as exc:
            if not self.root.is_dir():
                raise StorageError(f"cannot create storage directory {self.root}: {exc}") from exc
            # A read-only mount (the registry's) of a store nobody wrote to yet: reads simply
            # find nothing, and writes fail with a StorageError when attempted.
            log.warning("storage %s is not writable: %s", self.root, exc)

    # blobs

    def _blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self._blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _error("stat", self._blob_path(digest), exc) from exc

    def open_blob(self, digest: Digest) -> BinaryIO:
        # No verification here: the digest was checked when the blob was committed.
        path = self._blob_path(digest)
        try:
            return path.open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} not found in {self.url}") from exc
        except OSError as exc:
            raise _error("open", path, exc) from exc

    def blob_file(self, digest: Digest) -> str | None:
        """The committed blob's path (for ``sendfile``), or None when it does not exist."""
        path = self._blob_path(digest)
        return str(path) if path.is_file() else None

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[_FileBlobWriter]:
        writer = _FileBlobWriter(self._tmp, self._blobs)
        try:
            yield writer
        finally:
            writer.discard()

    def put_blob(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        with self.blob_writer() as writer:
            writer.write(data)
            writer.commit(digest)
        return digest

    def delete_blob(self, digest: Digest) -> None:
        _unlink(self._blob_path(digest))

    def list_blobs(self) -> Iterator[tuple[Digest, int, float]]:
        try:
            names = sorted(os.listdir(self._blobs))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _error("list", self._blobs, exc) from exc
        for name in names:
            if not _HEX.fullmatch(name):
                continue  # not ours (an editor's backup, a stray file): not a blob
            try:
                st = (self._blobs / name).stat()
            except FileNotFoundError:
                continue  # deleted by gc while we were listing
            yield Digest(name), st.st_size, st.st_mtime

    # metadata

    def read(self, key: str) -> bytes | None:
        path = self.root / check_key(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # A directory is a key prefix (tags/<repo>/), not a key.
            return None
        except OSError as exc:
            raise _error("read", path, exc) from exc

    def write(self, key: str, data: bytes) -> None:
        path = self.root / check_key(key)
        _make_parent(path, key)
        tmp = _TempFile(self._tmp, "meta-")
        try:
            tmp.write(data)
            tmp.publish(path)
        finally:
            tmp.discard()

    def delete(self, key: str) -> None:
        # Empty directories stay: removing them would race with a concurrent write below them.
        _unlink(self.root / check_key(key))

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix, like GCS), sorted."""
        check_prefix(prefix)
        top = prefix.rpartition("/")[0]
        keys: list[str] = []

        def walk_error(exc: OSError) -> None:
            # Missing, or a key where the prefix wants a directory: simply no keys there.
            if not isinstance(exc, FileNotFoundError | NotADirectoryError):
                raise _error("list", Path(exc.filename or top), exc) from exc

        for dirpath, dirnames, filenames in os.walk(self.root / top, onerror=walk_error):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            # Only descend where keys can still start with the prefix.
            dirnames[:] = [d for d in dirnames if _may_match(f"{rel}/{d}/", prefix)]
            keys.extend(k for f in filenames if (k := f"{rel}/{f}").startswith(prefix))
        # Sorted and eager: errors surface at the call, and stray files are skipped.
        return iter(sorted(k for k in keys if is_key(k)))

    # housekeeping

    def purge_stale_uploads(self, older_than: float) -> int:
        """Delete temporary files (crashed writers) older than ``older_than`` seconds.

        ``older_than`` must exceed the longest write: a live writer's file goes too.
        """
        cutoff = time.time() - older_than
        removed = 0
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"FilesystemStorage({self.url!r})"


class _TempFile:
    """A file in ``tmp/`` that is either published (renamed into place) or discarded."""

    def __init__(self, tmp_dir: Path, prefix: str) -> None:
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=tmp_dir)
        except OSError as exc:
            raise _error("create a temporary file in", tmp_dir, exc) from exc
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._open = True  # until published or discarded

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise _error("write", self.path, exc) from exc

    def publish(self, final: Path) -> None:
        """Make the content durable, then atomically rename it to ``final`` (durably too)."""
        try:
            self._file.flush()
            os.fchmod(self._file.fileno(), _FILE_MODE)
            os.fsync(self._file.fileno())
            self._file.close()
            # Replacing an existing blob is fine: same content (and a fresh mtime for gc).
            os.replace(self.path, final)
        except OSError as exc:
            raise _error("publish", final, exc) from exc
        # From here the name in tmp/ may belong to another writer: never unlink it again.
        self._open = False
        try:
            _fsync_dir(final.parent)
        except OSError as exc:
            raise _error("sync directory", final.parent, exc) from exc

    def discard(self) -> None:
        """Remove the file unless published; safe to call at any time, never raises."""
        if not self._open:
            return
        self._open = False
        # A full disk can fail the final flush; the file goes anyway.
        with contextlib.suppress(OSError):
            self._file.close()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # left for purge_stale_uploads; never hide the caller's error
            log.warning("cannot remove temporary file %s: %s", self.path, exc)


class _FileBlobWriter:
    """Streams into a temp file while hashing; ``commit`` verifies and renames into place."""

    def __init__(self, tmp_dir: Path, blobs_dir: Path) -> None:
        self._blobs = blobs_dir
        self._tmp = _TempFile(tmp_dir, "blob-")
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        self._check_open()
        self._tmp.write(data)
        self._hash.update(data)
        self._size += len(data)

    def commit(self, expected: Digest) -> None:
        self._check_open()
        actual = Digest(self._hash.hexdigest())
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


# helpers


def _may_match(dir_prefix: str, prefix: str) -> bool:
    return dir_prefix.startswith(prefix) or prefix.startswith(dir_prefix)


def _error(action: str, path: Path, exc: OSError) -> StorageError:
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_parent(path: Path, key: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        # tags/a/b exists and someone writes tags/a/b/c: a file cannot also be a directory.
        raise InvalidInput(
            f"storage key {key!r} clashes with an existing key that is a prefix of it "
            f"(the filesystem backend cannot hold both {key!r} and one of its parents)"
        ) from exc
    except OSError as exc:
        raise _error("create directory", path.parent, exc) from exc
    if path.is_dir():
        raise InvalidInput(
            f"storage key {key!r} clashes with existing keys below it "
            f"(the filesystem backend cannot hold both {key!r} and {key + '/…'!r})"
        )


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except IsADirectoryError:
        pass  # a key prefix, not a key: nothing to delete
    except OSError as exc:
        raise _error("delete", path, exc) from exc
