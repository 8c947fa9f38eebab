"""Deterministic layer tarballs, written in one streaming pass (DESIGN.md §4 step 4).

    entries ─► tar bytes ─► sha256 (diffID) ─► compressor ─► sha256 (digest), byte count ─► sink

Nothing of layer size is ever held in memory or on disk: tar bytes are assembled in one
fixed block (``BLOCK_SIZE``); file contents are read straight into that block; each full
block is hashed and compressed (both release the GIL on big buffers), and the compressed
bytes go to the sink, e.g. a storage ``BlobWriter``. The caller then calls
``sink.commit(packed.digest)``. ``pack_layers_parallel`` packs several layers at once, in
worker processes (default) or threads, always writing to the sinks in this process.

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

import contextlib
import hashlib
import os
import pickle
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cache, partial
from typing import BinaryIO, Literal, Protocol
from zlib import adler32

from niximage_builder.compression import (
    DEFAULT_LEVELS,
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

FORMAT_VERSION = 1
"""Bumped whenever the same files would give other tar bytes (order, modes, headers)."""

EntryKind = Literal["dir", "file", "symlink"]

_RECORD = 512
_ZEROS = bytes(_RECORD * 2)
_MAX_USTAR_SIZE = 0o77777777777  # 11 octal digits: 8 GiB - 1
_TYPEFLAGS: dict[str, bytes] = {"file": b"0", "symlink": b"2", "dir": b"5"}
# ustar fields, 512 bytes: name 100, mode 8, uid 8, gid 8, size 12, mtime 12, chksum 8,
# typeflag 1, linkname 100, magic 6 + version 2, uname 32, gname 32, devmajor 8,
# devminor 8, prefix 155, padding 12.
_IDS = b"%07o\0" % 0 * 2  # uid, gid
_MTIME_FIELD = b"%011o\0" % MTIME
_MAGIC_TO_DEVICES = b"ustar\x0000" + bytes(64) + b"%07o\0" % 0 * 2
_PAD = bytes(12)
_CHECKSUM_BLANK = b" " * 8
_PAX_NAME = b"././@PaxHeader"


class PackError(NixImageError):
    """A path cannot be packed: missing, unreadable, an unsupported file type, or changed
    while it was being read. Not transient: a Nix store path does not heal itself."""

    kind = "PackFailed"


class SupportsWrite(Protocol):
    """Where compressed layer bytes go: a storage ``BlobWriter``, a file, a test buffer."""

    def write(self, data: bytes, /) -> object: ...


def _valid_name(name: str) -> bool:
    """Relative, no empty, ``.`` or ``..`` part, no NUL (string tests only: this is hot)."""
    wrapped = f"/{name}/"
    return not (
        not name
        or name[0] == "/"
        or name[-1] == "/"
        or "//" in name
        or "\0" in name
        or "/./" in wrapped
        or "/../" in wrapped
    )


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
        if not _valid_name(self.name):
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


def layer_format(compression: Compression, level: int | None = None) -> str:
    """What decides a layer's bytes besides its files, for the layer key (DESIGN.md §2):
    ``tar1+gzip-2``. The compression library's version is left out on purpose: a cached
    layer stays valid (its metadata names its own digest) even if a newer library would
    compress the same tar to other bytes."""
    chosen = DEFAULT_LEVELS[compression] if level is None else level
    return f"tar{FORMAT_VERSION}+{compression}-{chosen}"


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


def _checksum(header: bytes) -> int:
    """Sum of the header's bytes, via adler32: its low half is 1 + the byte sum mod 65521,
    exact for 256 bytes (at most 65280), so two halves give the sum ~6× faster than sum()."""
    return (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) - 2


def _ustar(
    name: bytes, prefix: bytes, mode: int, size: int, typeflag: bytes, linkname: bytes
) -> bytes:
    """One ustar header block. Hot (once per entry): assembled from constant pieces."""
    header = b"".join(
        (
            name.ljust(100, b"\0"),
            _mode_field(mode),
            _IDS,
            b"%011o\0" % size,
            _MTIME_FIELD,
            _CHECKSUM_BLANK,
            typeflag,
            linkname.ljust(100, b"\0"),
            _MAGIC_TO_DEVICES,
            prefix.ljust(155, b"\0"),
            _PAD,
        )
    )
    return header[:148] + b"%06o\0 " % _checksum(header) + header[156:]


@cache
def _mode_field(mode: int) -> bytes:
    return b"%07o\0" % mode


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


def _pack_sorted(
    entries: Iterable[Entry], sink: SupportsWrite, compression: Compression, level: int | None
) -> PackedLayer:
    stream = _LayerStream(sink, make_compressor(compression, level))
    for entry in entries:
        _write_entry(stream, entry)
    return stream.finish(compression)


def pack_entries(
    entries: Iterable[Entry],
    sink: SupportsWrite,
    compression: Compression = "gzip",
    level: int | None = None,
) -> PackedLayer:
    """Pack arbitrary entries (normalised first: sorted, ancestors added) into one layer."""
    return _pack_sorted(normalize(entries), sink, compression, level)


def pack_paths(
    paths: Sequence[str],
    sink: SupportsWrite,
    compression: Compression = "gzip",
    level: int | None = None,
) -> PackedLayer:
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

    def run(self, sink: SupportsWrite | None = None) -> PackedLayer:
        """Pack into ``sink`` (default: the job's own) in this thread."""
        target = self.sink if sink is None else sink
        if self.entries is not None:
            return pack_entries(self.entries, target, self.compression, self.level)
        return pack_paths(self.paths, target, self.compression, self.level)


Parallelism = Literal["processes", "threads"]


def pack_layers_parallel(
    jobs: Sequence[LayerJob], workers: int | None = None, mode: Parallelism = "processes"
) -> list[PackedLayer]:
    """Pack layers ``workers`` at a time; results in job order; sinks written in this process.

    ``processes`` (the default) packs in child interpreters (``ProcessPacker``) and relays
    the compressed bytes to each job's sink from a thread of this process, so sinks never
    cross a process boundary. ``threads`` packs in the threads themselves. Hashing and
    compression release the GIL in both, but a layer of many small files spends much of
    its time in Python (walk, headers, open), and threads then queue for the GIL. Measured
    with ``benchmarks/pack.py`` on 2 CPUs: on a synthetic 800 MB tree of 43,000 entries,
    processes took 0.5-0.7 of the time of threads (threads were no faster than one
    thread); on ``big`` + ``python3`` (mostly 1 MiB files) the two are within noise. Workers
    cost about 0.2 s to start and 25 MB each. The first failure cancels the jobs not yet
    started and is raised once the running ones have finished.
    """
    if not jobs:
        return []
    count = min(len(jobs), workers or os.cpu_count() or 1)
    if mode == "threads":
        return _in_threads([job.run for job in jobs], count)
    with ProcessPacker(count) as packer:
        return _in_threads([partial(packer.pack, job) for job in jobs], count)


def _in_threads(tasks: Sequence[Callable[[], PackedLayer]], count: int) -> list[PackedLayer]:
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="pack") as pool:
        futures = [pool.submit(task) for task in tasks]
        _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    return [future.result() for future in futures]


# --- packing in child processes -------------------------------------------------------------
#
# A worker is a plain child interpreter (not multiprocessing: that re-imports the caller's
# main module in every child and needs the ``if __name__ == "__main__"`` idiom everywhere)
# running ``_serve``. Parent → worker on stdin: one frame per job, a pickled LayerJob
# without its sink. Worker → parent on stdout: data frames with compressed bytes, then one
# result frame (the PackedLayer) or error frame (the exception). Frame = kind byte, 8-byte
# big-endian length, payload. Both sides are this module, so pickle is fine.

_FRAME = struct.Struct(">cQ")
_JOB, _DATA, _RESULT, _ERROR = b"J", b"D", b"R", b"E"
_BUILDER_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from niximage_builder.tarball import _serve; _serve()"
)


def _write_frame(stream: BinaryIO, kind: bytes, payload: bytes) -> None:
    stream.write(_FRAME.pack(kind, len(payload)))
    stream.write(payload)


def _read_frame(stream: BinaryIO) -> tuple[bytes, bytes] | None:
    """The next frame, or None at a clean end of stream."""
    head = stream.read(_FRAME.size)
    if not head:
        return None
    if len(head) != _FRAME.size:
        raise EOFError("truncated frame header")
    kind, length = _FRAME.unpack(head)
    payload = stream.read(length)
    if len(payload) != length:
        raise EOFError("truncated frame")
    return kind, payload


class _FrameSink:
    """The worker's sink: each compressed chunk becomes one data frame."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        _write_frame(self._stream, _DATA, data)


class _NoSink:
    """Stands in for the parent's sink in the job sent to a worker."""

    def write(self, data: bytes) -> None:
        raise AssertionError("a worker writes frames, never to the job's sink")


def _serve() -> None:
    """The worker's main loop. Its own stdout becomes stderr so no stray print can corrupt
    the frames, which go to the original stdout descriptor."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    jobs = os.fdopen(0, "rb")
    while (frame := _read_frame(jobs)) is not None:
        job: LayerJob = pickle.loads(frame[1])
        try:
            packed = job.run(_FrameSink(out))
        except NixImageError as err:
            _write_frame(out, _ERROR, _pickled_error(err))
        except Exception as err:  # anything else still reaches the parent as a PackError
            _write_frame(out, _ERROR, pickle.dumps(PackError(f"{type(err).__name__}: {err}")))
        else:
            _write_frame(out, _RESULT, pickle.dumps(packed))
        out.flush()


def _pickled_error(err: NixImageError) -> bytes:
    try:
        return pickle.dumps(err)
    except Exception:  # an error with a custom constructor may not pickle: keep the message
        return pickle.dumps(PackError(str(err)))


class _Worker:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-c", _BOOT, _BUILDER_ROOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.idle = True
        """False while a job's frames may still be in the pipe: not reusable then."""

    def pack(self, job: LayerJob) -> PackedLayer:
        """Send the job, relay data frames to the sink, return the result or raise."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        child_job = LayerJob(_NoSink(), tuple(job.paths), job.entries, job.compression, job.level)
        self.idle = False
        _write_frame(stdin, _JOB, pickle.dumps(child_job))
        stdin.flush()
        while (frame := _read_frame(stdout)) is not None:
            kind, payload = frame
            if kind == _DATA:
                job.sink.write(payload)
                continue
            self.idle = True
            try:
                outcome = pickle.loads(payload)
            except Exception as err:  # e.g. an error class whose constructor differs
                raise PackError(f"unreadable answer from a packing worker: {err}") from None
            if kind == _ERROR:
                raise outcome
            return outcome  # type: ignore[no-any-return]
        raise EOFError("worker ended")

    def close(self) -> None:
        if self.process.stdin:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


class ProcessPacker:
    """Up to ``workers`` child interpreters that pack layers; ``pack`` is thread-safe.

    A worker is started on first need (0.1-0.5 s: an interpreter importing this module)
    and reused for later jobs; one whose job failed on our side (the sink raised) or that
    died is discarded and replaced. Use as a context manager; leaving it ends the workers.
    A pipeline that already runs a thread per layer keeps its threads and calls
    ``packer.pack(LayerJob(writer, paths, compression=...))`` instead of ``pack_paths``.
    """

    def __init__(self, workers: int | None = None) -> None:
        self._limit = threading.BoundedSemaphore(workers or os.cpu_count() or 1)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def pack(self, job: LayerJob) -> PackedLayer:
        with self._limit:
            worker = self._take()
            try:
                return worker.pack(job)
            except (EOFError, BrokenPipeError) as err:
                code = worker.process.poll()
                raise PackError(f"packing worker failed ({err}; exit code {code})") from None
            finally:  # after a sink failure the worker is mid-job: not reusable
                self._give_back(worker, worker.idle)

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise PackError("the ProcessPacker is closed")
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def _give_back(self, worker: _Worker, reusable: bool) -> None:
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(worker)
                return
        if not reusable:
            worker.process.kill()
        worker.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()

    def __enter__(self) -> ProcessPacker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
