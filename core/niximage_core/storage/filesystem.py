"""Storage in a local directory (docs/architecture.md#storage-layout): one file per blob or
metadata object.

    <root>/blobs/sha256/<hex>       committed blobs, immutable
    <root>/layers|builds|tags|gc/…  metadata objects, one file per key
    <root>/tmp/                     files being written; never listed or read

Everything is written to a temporary file in ``tmp/`` (same filesystem, so ``rename`` is
atomic), fsynced, then renamed into place and the directory fsynced: a reader sees either
the old object or the complete new one, and a crash leaves at most a stray file in ``tmp/``
(``filesystem_write``). Nothing uses xattrs (tmpfs and some overlay setups have none).

Deleting a key removes the directories it leaves empty, up to the top-level folder
(``tags/``): else every repository ever tagged leaves ``tags/<repository>/_tags/`` behind.
``rmdir`` removes only an empty directory, so a concurrent writer's file is never lost; a
writer whose directory is pruned between its ``mkdir`` and its rename makes it again.

The gc primitives (``base.Storage``'s gc part): ``touch_blob`` is ``utime`` under a shared
``flock`` of the blob file, after checking that the path still names the locked file;
``delete_blob_if_stale`` takes an exclusive ``flock``, checks, renames into ``tmp/gc-*``,
checks that the renamed file is the one checked (else puts it back), and unlinks.
``recover_trash`` finishes such a deletion, or undoes it, after a gc was killed in between.

Imports digest, errors, the storage interface, ``filesystem_write`` and ``checkpoints`` (the
test hook at the protocol's decision points).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from niximage_core.checkpoints import checkpoint
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NotFound, StorageError
from niximage_core.storage.base import LocalFile, check_key, check_prefix, is_key
from niximage_core.storage.filesystem_write import (
    DIRECTORY_ATTEMPTS,
    FileBlobWriter,
    TempFile,
    error,
)

log = logging.getLogger(__name__)

_HEX = re.compile(r"[a-f0-9]{64}")

TRASH_PREFIX = "gc-"
"""A blob being deleted is renamed to ``tmp/gc-<hex>.<random>`` first."""


class FilesystemStorage:
    """A ``Storage`` in the directory ``root``; see the module doc."""

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
            raise error("stat", self._blob_path(digest), exc) from exc

    def open_blob(self, digest: Digest) -> BinaryIO:
        # No verification here: the digest was checked when the blob was committed.
        path = self._blob_path(digest)
        try:
            return path.open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} not found in {self.url}") from exc
        except OSError as exc:
            raise error("open", path, exc) from exc

    def blob_delivery(self, digest: Digest, url_ttl: int | None) -> LocalFile:
        """Always the blob's own file: ``sendfile`` beats any redirect on a local disk."""
        return LocalFile(str(self._blob_path(digest)))

    def blob_file(self, digest: Digest) -> str | None:
        """The committed blob's path (for ``sendfile``), or None when it does not exist."""
        path = self._blob_path(digest)
        return str(path) if path.is_file() else None

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[FileBlobWriter]:
        writer = FileBlobWriter(self._tmp, self._blobs)
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
            raise error("list", self._blobs, exc) from exc
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
            raise error("read", path, exc) from exc

    def write(self, key: str, data: bytes) -> None:
        path = self.root / check_key(key)
        _make_parent(path, key)  # first: a clashing key fails before any writing
        tmp = TempFile(self._tmp, "meta-")
        try:
            tmp.write(data)
            # A concurrent delete may prune the directory before the rename: made again.
            tmp.publish(path, make_parent=lambda: _make_parent(path, key))
        finally:
            tmp.discard()

    def write_unless(self, key: str, data: bytes, keep: Callable[[bytes], bool]) -> bool:
        # Conditional writes of one directory's keys take turns under an exclusive flock
        # of the directory (a top-level one such as builds/ is never pruned); a reader
        # still sees the old or the new file, never a mix.
        path = self.root / check_key(key)
        _make_parent(path, key)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self.read(key)
            if current is not None and keep(current):
                return False
            self.write(key, data)
            return True
        except OSError as exc:
            raise error("write", path, exc) from exc
        finally:
            os.close(fd)  # releases the lock

    def delete(self, key: str) -> None:
        path = self.root / check_key(key)
        _unlink(path)
        _prune_empty_dirs(path.parent, stop=self.root / key.partition("/")[0])

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix, like GCS), sorted."""
        check_prefix(prefix)
        top = prefix.rpartition("/")[0]
        keys: list[str] = []

        def walk_error(exc: OSError) -> None:
            # Missing, or a key where the prefix wants a directory: simply no keys there.
            if not isinstance(exc, FileNotFoundError | NotADirectoryError):
                raise error("list", Path(exc.filename or top), exc) from exc

        for dirpath, dirnames, filenames in os.walk(self.root / top, onerror=walk_error):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            # Only descend where keys can still start with the prefix.
            dirnames[:] = [d for d in dirnames if _may_match(f"{rel}/{d}/", prefix)]
            keys.extend(k for f in filenames if (k := f"{rel}/{f}").startswith(prefix))
        # Sorted and eager: errors surface at the call, and stray files are skipped.
        return iter(sorted(k for k in keys if is_key(k)))

    # garbage collection (the gc package doc has the protocol)

    def touch_blob(self, digest: Digest) -> int | None:
        path = self._blob_path(digest)
        # A few rounds: a writer may replace the file (same content) while we look at it.
        for _ in range(3):
            with _locked_blob(path, fcntl.LOCK_SH, "touch") as held:
                if held == "missing":
                    return None  # never there, or gc deleted it before the lock was ours
                if isinstance(held, str):
                    continue  # replaced by a new copy: touch that one
                fd, locked = held
                try:
                    os.utime(fd)
                except PermissionError:
                    log.debug("cannot refresh the mtime of %s (not ours)", path)
                return locked.st_size
        return self.blob_size(digest)

    def delete_blob_if_stale(self, digest: Digest, cutoff: float) -> str:
        path = self._blob_path(digest)
        # Exclusive: no touch runs between our check and our rename.
        with _locked_blob(path, fcntl.LOCK_EX, "delete") as held:
            if held == "missing":
                return "missing"
            if isinstance(held, str):
                return "fresh"  # a writer just published a new copy
            _fd, locked = held
            if locked.st_mtime >= cutoff:
                return "fresh"
            checkpoint("gc.delete-checked", digest=digest)
            trash = self._tmp / f"{TRASH_PREFIX}{digest.hex}.{uuid.uuid4().hex[:12]}"
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

    def blob_mtime(self, digest: Digest) -> float | None:
        try:
            return self._blob_path(digest).stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat blob {digest}: {exc.strerror}") from exc

    def recover_trash(self, cutoff: float) -> int:
        """Finish what a killed gc left in ``tmp/gc-*``; blobs put back, counted."""
        restored = 0
        for path, mtime in list(self._temp_files()):
            if not path.name.startswith(TRASH_PREFIX):
                continue
            hex_ = path.name[len(TRASH_PREFIX) :].split(".", 1)[0]
            restored += self._recover_one(path, Digest(hex_), mtime >= cutoff)
        return restored

    def _recover_one(self, trash: Path, digest: Digest, fresh: bool) -> int:
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
                    _restore(trash, self._blob_path(digest))
                    return 1
                return 0
            with contextlib.suppress(FileNotFoundError):
                os.unlink(trash)
            return 0
        finally:
            os.close(fd)

    def count_stale_uploads(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        return sum(1 for _path, mtime in self._temp_files() if mtime < cutoff)

    def purge_stale_uploads(self, older_than: float) -> int:
        """Delete temporary files (crashed writers) older than ``older_than`` seconds.

        ``older_than`` must exceed the longest write: a live writer's file goes too.
        """
        cutoff = time.time() - older_than
        removed = 0
        for path, mtime in self._temp_files():
            if mtime < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
        return removed

    def _temp_files(self) -> Iterator[tuple[Path, float]]:
        """The files in ``tmp/`` and their mtimes; one that vanishes meanwhile is skipped."""
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False):
                    yield Path(entry.path), entry.stat().st_mtime

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"FilesystemStorage({self.url!r})"


# helpers


@contextlib.contextmanager
def _locked_blob(path: Path, lock: int, doing: str) -> Iterator[tuple[int, os.stat_result] | str]:
    """The blob file open under ``flock(lock)``: ``(fd, its stat)``; or ``"missing"`` (no
    such file, or it was deleted before the lock was ours), or ``"replaced"`` (a writer
    published a new copy meanwhile: the locked file is an old one). An ``OSError``, here or
    in the ``with`` block, becomes a ``StorageError`` saying what was being done."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield "missing"
        return
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, lock)
        locked = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is None:
            yield "missing"
        elif not _same_file(locked, current):
            yield "replaced"
        else:
            yield fd, locked
    except OSError as exc:
        raise StorageError(f"cannot {doing} {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _restore(trash: Path, path: Path) -> None:
    # Published again meanwhile (FileExistsError): the same content is there already.
    # Another gc restoring the same file (FileNotFoundError): it is back.
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.link(trash, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(trash)


def _may_match(dir_prefix: str, prefix: str) -> bool:
    return dir_prefix.startswith(prefix) or prefix.startswith(dir_prefix)


def _make_parent(path: Path, key: str) -> None:
    try:
        _make_dirs(path.parent)
    except (FileExistsError, NotADirectoryError) as exc:
        # tags/a/b exists and someone writes tags/a/b/c: a file cannot also be a directory.
        raise InvalidInput(
            f"storage key {key!r} clashes with an existing key that is a prefix of it "
            f"(the filesystem backend cannot hold both {key!r} and one of its parents)"
        ) from exc
    except OSError as exc:
        raise error("create directory", path.parent, exc) from exc
    if path.is_dir():
        raise InvalidInput(
            f"storage key {key!r} clashes with existing keys below it "
            f"(the filesystem backend cannot hold both {key!r} and {key + '/…'!r})"
        )


def _make_dirs(directory: Path) -> None:
    """``mkdir -p``, again when a concurrent delete prunes a directory just made: pathlib
    makes the parents, then the child (the parent may be gone by then, FileNotFoundError),
    and on "exists" checks ``is_dir`` afterwards (the directory may be gone by then,
    FileExistsError with nothing there). Only a non-directory in the way is a clash."""
    for _ in range(DIRECTORY_ATTEMPTS - 1):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
        except FileExistsError:
            if os.path.lexists(directory) and not directory.is_dir():
                raise
            continue
    directory.mkdir(parents=True, exist_ok=True)


def _prune_empty_dirs(directory: Path, stop: Path) -> None:
    """Remove ``directory`` and its parents below ``stop`` for as long as they are empty.

    ``rmdir`` fails on a directory that is not empty, atomically: one holding a concurrent
    writer's file (or a writer's new subdirectory) stays. Pruning is tidying: any other
    failure leaves the directory, and the delete has succeeded anyway.
    """
    while stop in directory.parents:
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass  # another delete pruned it: its parent may be empty now
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                log.debug("cannot remove empty directory %s: %s", directory, exc)
            return
        directory = directory.parent


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except IsADirectoryError:
        pass  # a key prefix, not a key: nothing to delete
    except OSError as exc:
        raise error("delete", path, exc) from exc
