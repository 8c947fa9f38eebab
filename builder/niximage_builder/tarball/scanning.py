"""Collecting entries: absolute paths → the sorted, de-duplicated entries of one layer.

Reads the file system (lstat, readlink, scandir) but no file contents; imports entries only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator

from niximage_builder.tarball.entries import Entry, PackError

ANCESTOR_MODE = 0o755
"""Mode of the directories above a packed path (``nix/``, ``nix/store/``)."""


def _absolute(path: str) -> str:
    """Normalise an absolute path; the tar name is derived from it, so relative is refused."""
    if not os.path.isabs(path):
        raise PackError(f"not an absolute path: {path!r}")
    norm = os.path.normpath(path)
    if norm.startswith("//"):  # POSIX keeps a leading "//"; it names the same root here
        norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise PackError("cannot pack the whole file system ('/')")
    return norm


def entry_from_stat(path: str, name: str, st: os.stat_result) -> Entry:
    """The tar entry for one file system object, not following symlinks."""
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return Entry(name, "dir", mode)
    if stat.S_ISREG(st.st_mode):
        return Entry(name, "file", mode, size=st.st_size, source=path)
    if stat.S_ISLNK(st.st_mode):
        return Entry.symlink(name, _readlink(path))
    raise PackError(f"{path}: cannot store a {_describe(st.st_mode)} in a layer")


def _describe(mode: int) -> str:
    for test, what in (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return what
    return f"file of type {stat.S_IFMT(mode):o}"


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError as err:
        raise PackError(f"{path}: {err.strerror}") from err


def _walk(root: str) -> Iterator[Entry]:
    """``root`` and everything below it. Order does not matter: ``normalize`` sorts.

    Symlinks are recognised from the directory listing and never stat'ed; every other
    child costs one lstat (mode and size).
    """
    try:
        st = os.lstat(root)
        yield entry_from_stat(root, root[1:], st)
        pending = [root] if stat.S_ISDIR(st.st_mode) else []
        while pending:
            with os.scandir(pending.pop()) as listing:
                for child in listing:
                    if child.is_symlink():
                        yield Entry.symlink(child.path[1:], _readlink(child.path))
                        continue
                    st = child.stat(follow_symlinks=False)
                    yield entry_from_stat(child.path, child.path[1:], st)
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(child.path)
    except OSError as err:
        raise PackError(f"{err.filename or root}: {err.strerror}") from err


def _name_key(entry: Entry) -> bytes:
    return os.fsencode(entry.name)


def normalize(entries: Iterable[Entry]) -> list[Entry]:
    """De-duplicate, add missing ancestor directories (0755), sort by name as bytes.

    The same name twice is fine when both entries are equal (overlapping paths); otherwise
    the layer would depend on input order, so it is an error. Idempotent.
    """
    by_name: dict[str, Entry] = {}
    for entry in entries:
        known = by_name.setdefault(entry.name, entry)
        if known is not entry and known != entry:
            raise PackError(f"two different entries for {entry.name!r}: {known} and {entry}")
    for name in list(by_name):
        parent = name.rpartition("/")[0]
        while parent:
            known = by_name.get(parent)
            if known is not None:
                if known.kind != "dir":
                    raise PackError(f"{name!r} is below {parent!r}, which is not a directory")
                break
            by_name[parent] = Entry.directory(parent, ANCESTOR_MODE)
            parent = parent.rpartition("/")[0]
    return sorted(by_name.values(), key=_name_key)


def scan_paths(paths: Iterable[str]) -> list[Entry]:
    """Every entry of the given absolute paths and their ancestors, normalised.

    Input order and duplicates do not matter; a path inside another is fine.
    """
    entries: list[Entry] = []
    for root in sorted({_absolute(p) for p in paths}):
        entries.extend(_walk(root))
    return normalize(entries)
