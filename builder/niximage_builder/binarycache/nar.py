"""NAR archives → the tar entries of a store path, in one pass over the stream.

A NAR (Nix ARchive) holds what a store path is: regular files (executable or not), symlinks
and directories, with no owners, times or other modes; every string is a little-endian
64-bit length, the bytes and zero padding to 8. The stream is read once: each byte goes to
a spool file and the hash, and the entries are parsed as it passes. A file's entry names the
region of the spool that holds its contents, so the layer is packed later, in the tar's
order (sorted by full name, which is not the NAR's), without a store write. The entries are
the ones ``tarball.scan_paths`` gives for the same path in a store (modes 0444 or 0555 for
files, 0555 for directories), so both ways give the same layer bytes.

Reads only the stream it is given and writes only the spool; imports tarball entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from niximage_builder.tarball.entries import Entry, PackError
from niximage_core.errors import SubstituteError

MAGIC = b"nix-archive-1"
COPY_SIZE = 1 << 20
_MAX_TOKEN = 4096
"""Longest string a NAR holds besides file contents (a symlink target: PATH_MAX)."""
_FILE_MODES = {False: 0o444, True: 0o555}
DIR_MODE = 0o555


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class NarFormatError(SubstituteError):
    def __init__(self, message: str) -> None:
        super().__init__("CorruptCache", message)


@dataclass(frozen=True)
class NarListing:
    entries: list[Entry]
    """Every entry of the store path (not yet sorted as a tar wants them)."""
    nar_size: int
    nar_hash: bytes
    """sha256 of the NAR's bytes."""


class _Tee:
    """Reads from the stream, writing every byte to the spool and the hash."""

    def __init__(self, stream: Readable, spool: BinaryIO, limit: int, what: str) -> None:
        self._stream = stream
        self._spool = spool
        self._limit = limit
        self._what = what
        self.hash = hashlib.sha256()
        self.offset = 0

    def read_exact(self, size: int) -> bytes:
        if self.offset + size > self._limit:
            raise NarFormatError(f"{self._what}: the NAR is longer than its narinfo's NarSize")
        parts = []
        wanted = size
        while wanted:
            data = self._stream.read(min(wanted, COPY_SIZE))
            if not data:
                raise NarFormatError(f"{self._what}: the NAR ends early (truncated)")
            parts.append(data)
            wanted -= len(data)
            self.hash.update(data)
            self._spool.write(data)
        self.offset += size
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def skip(self, size: int) -> None:
        """Pass ``size`` bytes through to the spool (file contents) in bounded reads."""
        while size:
            size -= len(self.read_exact(min(size, COPY_SIZE)))

    def at_end(self) -> bool:
        return not self._stream.read(1)

    def int(self) -> int:
        return int.from_bytes(self.read_exact(8), "little")

    def string(self, limit: int = _MAX_TOKEN) -> bytes:
        size = self.int()
        if size > limit:
            raise NarFormatError(f"{self._what}: a NAR string of {size} bytes (over {limit})")
        data = self.read_exact(size)
        padding = self.read_exact(-size % 8)
        if padding.strip(b"\0"):
            raise NarFormatError(f"{self._what}: non-zero NAR padding")
        return data

    def expect(self, token: bytes) -> None:
        got = self.string()
        if got != token:
            raise NarFormatError(f"{self._what}: expected {token!r} in the NAR, got {got[:40]!r}")


def read_nar(
    stream: Readable, store_path: str, spool: BinaryIO, spool_path: str, nar_size: int
) -> NarListing:
    """Parse the NAR of ``store_path`` from ``stream`` while copying it to ``spool`` (whose
    file is ``spool_path``, at offset 0). Raises ``NarFormatError`` for anything that is not
    a well-formed NAR of exactly ``nar_size`` bytes; the caller checks the hash."""
    tee = _Tee(stream, spool, nar_size, store_path)
    tee.expect(MAGIC)
    entries: list[Entry] = []
    open_dirs: list[tuple[str, bytes]] = []
    """Directories being read: (entry name, the last child's name, for the order check)."""
    root = store_path.lstrip("/")

    def node(name: str) -> None:
        tee.expect(b"(")
        tee.expect(b"type")
        kind = tee.string()
        if kind == b"regular":
            token = tee.string()
            executable = token == b"executable"
            if executable:
                tee.expect(b"")
                token = tee.string()
            if token != b"contents":
                raise NarFormatError(f"{store_path}: expected 'contents' in the NAR")
            size = tee.int()
            entries.append(
                Entry(
                    name,
                    "file",
                    _FILE_MODES[executable],
                    size=size,
                    source=spool_path,
                    offset=tee.offset,
                )
            )
            tee.skip(size)
            tee.read_exact(-size % 8)
            tee.expect(b")")
        elif kind == b"symlink":
            tee.expect(b"target")
            target = tee.string().decode("utf-8", "surrogateescape")
            entries.append(Entry.symlink(name, target))
            tee.expect(b")")
        elif kind == b"directory":
            entries.append(Entry.directory(name, DIR_MODE))
            open_dirs.append((name, b""))
        else:
            raise NarFormatError(f"{store_path}: unknown NAR node type {kind[:40]!r}")

    try:
        node(root)
        while open_dirs:
            token = tee.string()
            if token == b")":
                open_dirs.pop()
                if open_dirs:
                    tee.expect(b")")  # the parent's "entry (" around this directory
                continue
            if token != b"entry":
                raise NarFormatError(f"{store_path}: expected 'entry' in the NAR")
            tee.expect(b"(")
            tee.expect(b"name")
            child = tee.string(255)
            parent, previous = open_dirs[-1]
            if child in (b"", b".", b"..") or b"/" in child or b"\0" in child:
                raise NarFormatError(f"{store_path}: NAR entry name {child[:40]!r} is not allowed")
            if child <= previous:
                raise NarFormatError(f"{store_path}: NAR entries of {parent} are not sorted")
            open_dirs[-1] = (parent, child)
            tee.expect(b"node")
            before = len(open_dirs)
            node(f"{parent}/{child.decode('utf-8', 'surrogateescape')}")
            if len(open_dirs) == before:
                tee.expect(b")")  # the entry of a file or symlink ends here
    except PackError as err:  # an entry our tar cannot hold (a name, a mode)
        raise NarFormatError(f"{store_path}: {err}") from err
    if tee.offset != nar_size or not tee.at_end():
        raise NarFormatError(f"{store_path}: the NAR is not NarSize ({nar_size}) bytes long")
    return NarListing(entries, tee.offset, tee.hash.digest())
