"""Deterministic layer tarballs, written in one streaming pass (DESIGN.md §4 step 4).

    entries ─► tar bytes ─► sha256 (diffID) ─► compressor ─► sha256 (digest), byte count ─► sink

Nothing of layer size is ever held in memory or on disk: tar bytes are assembled in one
fixed block (``BLOCK_SIZE``); file contents are read straight into that block; each full
block is hashed and compressed (both release the GIL on big buffers, so threads packing
different layers run in parallel), and the compressed bytes go to the sink, e.g. a storage
``BlobWriter``. The caller then calls ``sink.commit(packed.digest)``.

The tar format, chosen so that the same files always give the same bytes:

- Entry names are relative (the OCI layer convention): ``/nix/store/<hash>-x/bin/y`` is
  stored as ``nix/store/<hash>-x/bin/y``; directory names end in ``/``. Any absolute path can
  be packed, the name is always the path without its leading slash.
- Entries are sorted by name as bytes, which puts every directory before its contents.
  Every ancestor directory of a packed path (``nix/``, ``nix/store/``) has its own entry,
  mode 0755; every directory inside a packed path keeps its own mode (0555 in the store),
  so empty directories survive and modes do not fall back to the runtime's defaults.
- mtime is 1 for every entry, like the files in a Nix store, uid and gid are 0, user and
  group names empty, device numbers 0.
- Regular files keep their permission bits; hard links become independent regular files;
  symlinks stay symlinks. Devices, FIFOs and sockets cannot be stored (``PackError``):
  a Nix store never has them.
- ustar headers; a name that fits neither the 100-byte name field nor the ustar
  prefix/name split, a link target over 100 bytes, and a file of 8 GiB or more get a PAX
  extended header (``././@PaxHeader``, as Python's tarfile names it). GNU tar, Python's
  tarfile, umoci and containerd read all of these.
- The archive ends with two zero blocks and no record padding.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal, Protocol

from niximage_builder.compression import (
    OCI_LAYER_MEDIA_TYPES,
    Compression,
    Compressor,
    make_compressor,
)
from niximage_builder.digest import Digest
from niximage_builder.errors import NixImageError

BLOCK_SIZE = 1 << 20
"""Bytes hashed and compressed at a time. Big enough that the GIL is released for nearly all
of the work, small enough that a few parallel layers stay far below 100 MB of memory."""

MTIME = 1
"""The mtime of every entry: Nix's own epoch (store files have mtime 1)."""

ANCESTOR_MODE = 0o755
"""Mode of the directories above a packed path (``nix/``, ``nix/store/``)."""

EntryKind = Literal["dir", "file", "symlink"]

_RECORD = 512
_ZEROS = bytes(_RECORD * 2)
_MAX_USTAR_SIZE = 0o77777777777  # 11 octal digits: 8 GiB - 1
_TYPEFLAGS: dict[str, bytes] = {"file": b"0", "symlink": b"2", "dir": b"5"}
_HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12s")
_ZERO_ID = b"%07o\0" % 0
_MTIME_FIELD = b"%011o\0" % MTIME
_CHECKSUM_BLANK = b" " * 8
_PAX_NAME = b"././@PaxHeader"


class PackError(NixImageError):
    """A path cannot be packed: missing, unreadable, an unsupported file type, or changed
    while it was being read. Not transient: a Nix store path does not heal itself."""

    kind = "PackFailed"


class SupportsWrite(Protocol):
    """Where compressed layer bytes go: a storage ``BlobWriter``, a file, a test buffer."""

    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """One tar entry: a directory, a symlink, or a file whose bytes come from ``source``
    (a path read while packing) or ``data`` (synthetic content, e.g. a generated file)."""

    name: str
    """Relative path in the layer, no leading or trailing slash: ``nix/store/<hash>-x/bin``."""
    kind: EntryKind
    mode: int
    """Permission bits, including setuid/setgid/sticky (``0o1777`` for ``tmp``)."""
    size: int = 0
    target: str = ""
    """Symlink target, stored verbatim (absolute targets stay absolute)."""
    source: str | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        parts = self.name.split("/")
        if not self.name or any(p in ("", ".", "..") for p in parts) or "\0" in self.name:
            raise PackError(f"invalid tar entry name {self.name[:200]!r}")
        if self.kind not in _TYPEFLAGS or not 0 <= self.mode <= 0o7777:
            raise PackError(f"{self.name}: invalid entry kind {self.kind!r} or mode {self.mode:o}")
        if self.kind == "symlink" and not self.target:
            raise PackError(f"{self.name}: a symlink needs a target")
        if self.kind == "file" and (self.source is None) == (self.data is None):
            raise PackError(f"{self.name}: a file needs exactly one of source and data")
        if self.data is not None and self.size != len(self.data):
            raise PackError(f"{self.name}: size {self.size} but {len(self.data)} bytes of data")

    @classmethod
    def directory(cls, name: str, mode: int = 0o755) -> Entry:
        return cls(name, "dir", mode)

    @classmethod
    def symlink(cls, name: str, target: str) -> Entry:
        """Symlinks are stored with mode 0777, as Linux reports them."""
        return cls(name, "symlink", 0o777, target=target)

    @classmethod
    def file(cls, name: str, source: str, size: int, mode: int = 0o444) -> Entry:
        return cls(name, "file", mode, size=size, source=source)

    @classmethod
    def inline(cls, name: str, data: bytes, mode: int = 0o444) -> Entry:
        return cls(name, "file", mode, size=len(data), data=data)


@dataclass(frozen=True)
class PackedLayer:
    """What a packed layer is known by: the config's diffID and the manifest's digest/size."""

    diff_id: Digest
    """sha256 of the uncompressed tar (``rootfs.diff_ids``)."""
    digest: Digest
    """sha256 of the compressed blob (manifest ``layers[].digest``, storage name)."""
    size: int
    """Compressed bytes: the blob's size."""
    tar_size: int
    """Uncompressed tar bytes."""
    compression: Compression = "gzip"

    @property
    def media_type(self) -> str:
        return OCI_LAYER_MEDIA_TYPES[self.compression]


# --- collecting entries ---------------------------------------------------------------------


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
    for test, what in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return what
    return f"file of type {stat.S_IFMT(mode):o}"


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError as err:
        raise PackError(f"{path}: {err.strerror}") from err


def _walk(root: str) -> Iterator[Entry]:
    """``root`` and everything below it. Order does not matter: ``normalize`` sorts."""
    try:
        st = os.lstat(root)
        yield entry_from_stat(root, root[1:], st)
        pending = [root] if stat.S_ISDIR(st.st_mode) else []
        while pending:
            directory = pending.pop()
            with os.scandir(directory) as listing:
                for child in listing:
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


# --- tar headers ----------------------------------------------------------------------------


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) fields for a ustar header, or None when a PAX path is needed.

    The shortest prefix that works is taken (as Python's tarfile does): deterministic.
    """
    if len(name) <= 100:
        return b"", name
    start = 0
    while (cut := name.find(b"/", start, 156)) != -1:
        rest = name[cut + 1 :]
        if 0 < len(rest) <= 100:
            return name[:cut], rest
        start = cut + 1
    return None


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """``"<len> <keyword>=<value>\\n"`` where len counts the whole record, itself included."""
    body = len(keyword) + len(value) + 3
    length = previous = 0
    while True:
        length = body + len(str(previous))
        if length == previous:
            break
        previous = length
    return b"%d %s=%s\n" % (length, keyword, value)


def _ustar(name: bytes, prefix: bytes, mode: int, size: int, typeflag: bytes,
           linkname: bytes) -> bytes:
    header = bytearray(_HEADER.pack(
        name, b"%07o\0" % mode, _ZERO_ID, _ZERO_ID, b"%011o\0" % size, _MTIME_FIELD,
        _CHECKSUM_BLANK, typeflag, linkname, b"ustar\0", b"00", b"", b"",
        _ZERO_ID, _ZERO_ID, prefix, b"",
    ))
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def tar_header(entry: Entry) -> bytes:
    """The header block(s) of one entry: a PAX extended header when ustar cannot hold it."""
    name = os.fsencode(entry.name) + (b"/" if entry.kind == "dir" else b"")
    link = os.fsencode(entry.target) if entry.kind == "symlink" else b""
    size = entry.size if entry.kind == "file" else 0
    records: list[tuple[bytes, bytes]] = []
    split = _split_ustar(name)
    if split is None:
        records.append((b"path", name))
        split = b"", name[:100]
    if len(link) > 100:
        records.append((b"linkpath", link))
        link = link[:100]
    if size > _MAX_USTAR_SIZE:
        records.append((b"size", b"%d" % size))
        size = 0
    header = _ustar(split[1], split[0], entry.mode, size, _TYPEFLAGS[entry.kind], link)
    if not records:
        return header
    if not all(_is_utf8(value) for _, value in records):
        records.insert(0, (b"hdrcharset", b"BINARY"))  # raw bytes, as POSIX allows
    payload = b"".join(_pax_record(k, v) for k, v in records)
    pax = _ustar(_PAX_NAME, b"", 0o644, len(payload), b"x", b"")
    return pax + payload + _ZEROS[: -len(payload) % _RECORD] + header


# --- the streaming pipeline -----------------------------------------------------------------


class _LayerStream:
    """Tar bytes in, compressed bytes out to the sink; both sides hashed and counted.

    Tar bytes fill one fixed block and go on only as whole blocks, so the compressed output
    is a function of the tar bytes alone (not of file sizes or read sizes).
    """

    def __init__(self, sink: SupportsWrite, compressor: Compressor) -> None:
        self._sink = sink
        self._compressor = compressor
        self._block = bytearray(BLOCK_SIZE)
        self._view = memoryview(self._block)
        self._pos = 0
        self._diff_id = hashlib.sha256()
        self._digest = hashlib.sha256()
        self.tar_size = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append small bytes (headers, padding, inline files)."""
        view = memoryview(data)
        while view:
            take = min(BLOCK_SIZE - self._pos, len(view))
            self._view[self._pos : self._pos + take] = view[:take]
            self._pos += take
            view = view[take:]
            if self._pos == BLOCK_SIZE:
                self._emit(self._view)

    def copy_file(self, fd: int, size: int, path: str) -> None:
        """Read exactly ``size`` bytes of ``fd`` straight into the block, never more at once."""
        remaining = size
        while remaining:
            take = min(BLOCK_SIZE - self._pos, remaining)
            got = os.readv(fd, [self._view[self._pos : self._pos + take]])
            if got == 0:
                raise PackError(f"{path}: file shrank while it was being packed")
            self._pos += got
            remaining -= got
            if self._pos == BLOCK_SIZE:
                self._emit(self._view)

    def _emit(self, block: memoryview) -> None:
        self._diff_id.update(block)
        self.tar_size += len(block)
        self._output(self._compressor.compress(block))
        self._pos = 0

    def _output(self, data: bytes) -> None:
        if data:
            self._digest.update(data)
            self.size += len(data)
            self._sink.write(data)

    def finish(self, compression: Compression) -> PackedLayer:
        """End the archive, flush the compressor; the sink has every byte afterwards."""
        self.write(_ZEROS)
        if self._pos:
            self._emit(self._view[: self._pos])
        self._output(self._compressor.flush())
        return PackedLayer(
            diff_id=Digest(self._diff_id.hexdigest()),
            digest=Digest(self._digest.hexdigest()),
            size=self.size,
            tar_size=self.tar_size,
            compression=compression,
        )


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _write_entry(stream: _LayerStream, entry: Entry) -> None:
    stream.write(tar_header(entry))
    if entry.kind != "file":
        return
    if entry.data is not None:
        stream.write(entry.data)
    else:
        _copy_source(stream, entry)
    stream.write(_ZEROS[: -entry.size % _RECORD])


def _copy_source(stream: _LayerStream, entry: Entry) -> None:
    """Copy a file's bytes; it must still be the regular file of the size scanned (the
    header with that size is already written), and FIFOs must not block us."""
    path = entry.source or ""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        raise PackError(f"{path}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            raise PackError(f"{path}: changed while it was being packed")
        stream.copy_file(fd, entry.size, path)
    except OSError as err:
        raise PackError(f"{path}: {err.strerror}") from err
    finally:
        os.close(fd)


def _pack_sorted(entries: Iterable[Entry], sink: SupportsWrite, compression: Compression,
                 level: int | None) -> PackedLayer:
    stream = _LayerStream(sink, make_compressor(compression, level))
    for entry in entries:
        _write_entry(stream, entry)
    return stream.finish(compression)


def pack_entries(entries: Iterable[Entry], sink: SupportsWrite,
                 compression: Compression = "gzip", level: int | None = None) -> PackedLayer:
    """Pack arbitrary entries (normalised first: sorted, ancestors added) into one layer."""
    return _pack_sorted(normalize(entries), sink, compression, level)


def pack_paths(paths: Sequence[str], sink: SupportsWrite, compression: Compression = "gzip",
               level: int | None = None) -> PackedLayer:
    """Pack absolute paths (store paths, or any directories and files) into one layer.

    Writes the compressed blob to ``sink``; the caller commits it with ``packed.digest``.
    """
    return _pack_sorted(scan_paths(paths), sink, compression, level)


# --- many layers at once --------------------------------------------------------------------


@dataclass(frozen=True)
class LayerJob:
    """One layer to pack by ``pack_layers_parallel``: store paths (or entries) and a sink."""

    sink: SupportsWrite
    paths: Sequence[str] = ()
    entries: Sequence[Entry] | None = None
    """When given, packed instead of ``paths`` (e.g. the top layer's symlink forest)."""
    compression: Compression = "gzip"
    level: int | None = None

    def run(self) -> PackedLayer:
        if self.entries is not None:
            return pack_entries(self.entries, self.sink, self.compression, self.level)
        return pack_paths(self.paths, self.sink, self.compression, self.level)


def pack_layers_parallel(jobs: Sequence[LayerJob], workers: int | None = None) -> list[PackedLayer]:
    """Pack layers in a thread pool; results in job order.

    Threads, not processes: hashing, compression and file reads release the GIL, so threads
    scale like processes (measured in ``benchmarks/pack.py``) and can write to sinks that
    cannot cross a process boundary (storage clients, open uploads). The first failure
    cancels the jobs not yet started and is raised once the running ones have finished.
    """
    if not jobs:
        return []
    count = min(len(jobs), workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="pack") as pool:
        futures = [pool.submit(job.run) for job in jobs]
        _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    return [future.result() for future in futures]
