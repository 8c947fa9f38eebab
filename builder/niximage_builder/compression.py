"""Deterministic layer compressors: gzip (ISA-L), zstd, or none. Of ours, imports errors only.

Every compressor is a small streaming object (``compress(block) -> bytes``, then ``flush()``)
whose output is a function of the input bytes alone: no timestamps, names or host details.
ISA-L and zstd release the GIL while they work on a block.

A layer is compressed in chunks (``compress_chunk``): every ``CHUNK_SIZE`` bytes of tar, at
fixed offsets, become one self-contained gzip member or zstd frame, fed to the compressor
in ``FEED_SIZE`` pieces. RFC 1952 allows a gzip file of several members and the zstd format
several frames; every OCI client reads both (Go's compress/gzip and klauspost/zstd, as in
containerd, podman and skopeo; Python's gzip; GNU gzip). The chunks of one big store path
compress on every core at once, and the bytes depend on the tar bytes alone, never on
the number of threads. A layer of at most one chunk is one member, as before chunks.

Levels, measured with ``benchmarks/pack.py`` on the offline package set's ``big`` (800 MiB)
plus ``python3``: 870 MB of files, packed serially; CPU seconds of the whole packing (walk,
tar, both sha256, compression) and size against ``tar | gzip -6`` (48 CPU s, 306.5 MB):

=========  =====  ======  =====
codec      level  CPU s   size
=========  =====  ======  =====
ISA-L      0      3.8     1.247
ISA-L      1      4.3     1.133
ISA-L      2      4.1     1.119
ISA-L      3      7.2     1.099
zstd       1      5.2     1.002
zstd       3      8.4     0.870
=========  =====  ======  =====

- gzip: ISA-L level 2, the default. About as fast as level 0 and smaller than level 1;
  level 3 costs 75 % more CPU for 2 % less size. Level 2
  stays well inside the issue's targets (≥ 8× the throughput of ``gzip -6``, ≤ 1.15× its
  size): about 12× less CPU and 1.12× the size.
- zstd: level 3, zstd's own default: 13 % smaller
  than ``gzip -6`` for twice the CPU of our gzip. No checksum and no content size in the
  frame (a stream's size is unknown when the frame starts; layer digests already protect
  the bytes).

Another ISA-L or zstd release may compress the same tar to other bytes (as Go's
compress/gzip may for Nixery); cached layers stay valid because their metadata names their
own digest, and ``tarball.layer_format`` leaves library versions out of the layer key.
"""

from __future__ import annotations

import struct
from typing import Literal, Protocol

import zstandard
from isal import isal_zlib

from niximage_core.errors import InvalidInput

CHUNK_SIZE = 4 << 20
"""Tar bytes per gzip member / zstd frame. Big enough that the members cost nothing
measurable in size (the dictionary restarts every 4 MiB: well under 0.1 %), small enough
that an 800 MB store path gives 200 pieces of work to share among the cores."""
FEED_SIZE = 1 << 20
"""Bytes handed to the compressor per call, within a chunk."""

Compression = Literal["gzip", "zstd", "none"]
COMPRESSIONS: tuple[Compression, ...] = ("gzip", "zstd", "none")

DEFAULT_LEVELS: dict[Compression, int] = {"gzip": 2, "zstd": 3, "none": 0}

OCI_LAYER_MEDIA_TYPES: dict[Compression, str] = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
"""OCI layer media type per compression (Docker schema2 knows gzip and none only)."""

# RFC 1952 member header: magic, CM=deflate, FLG=0 (no name, comment, extra), MTIME=0,
# XFL=0, OS=255 ("unknown": the same on every host). The same bytes ISA-L and Go emit.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


class Compressor(Protocol):
    """A streaming compressor: feed blocks, then ``flush`` once for the stream's tail."""

    def compress(self, data: bytes | bytearray | memoryview) -> bytes: ...

    def flush(self) -> bytes: ...


class GzipCompressor:
    """A single-member gzip stream around ISA-L's raw deflate.

    We write the header and trailer ourselves instead of relying on the library's wbits=31
    mode so that the bytes around the deflate data can never change with a library update.
    """

    def __init__(self, level: int) -> None:
        if not isal_zlib.ISAL_BEST_SPEED <= level <= isal_zlib.ISAL_BEST_COMPRESSION:
            raise InvalidInput(f"gzip (ISA-L) level must be 0..3, not {level}")
        self._deflate = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
        self._crc = 0
        self._size = 0
        self._header_sent = False

    def _with_header(self, out: bytes) -> bytes:
        """Prefix the header to the first output (also for an empty stream)."""
        if self._header_sent:
            return out
        self._header_sent = True
        return GZIP_HEADER + out

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        self._crc = isal_zlib.crc32(data, self._crc)
        self._size += len(data)
        return self._with_header(self._deflate.compress(data))

    def flush(self) -> bytes:
        trailer = struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF)
        return self._with_header(self._deflate.flush() + trailer)


class ZstdCompressor:
    """One zstd frame, single-threaded, without checksum or content size."""

    def __init__(self, level: int) -> None:
        if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise InvalidInput(f"zstd level must be 1..{zstandard.MAX_COMPRESSION_LEVEL}")
        params = zstandard.ZstdCompressor(
            level=level, write_checksum=False, write_content_size=False, threads=0
        )
        self._obj = params.compressobj()

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


class IdentityCompressor:
    """No compression: the layer blob is the tar itself (diffID == digest)."""

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        # A copy: the tar writer reuses its block buffer after this call returns.
        return bytes(data)

    def flush(self) -> bytes:
        return b""


def compress_chunk(
    compression: Compression, level: int | None, chunk: bytes | bytearray | memoryview
) -> bytes:
    """One chunk of a layer as a self-contained member (gzip), frame (zstd) or itself."""
    compressor = make_compressor(compression, level)
    view = memoryview(chunk)
    pieces = range(0, len(view), FEED_SIZE)
    parts = [compressor.compress(view[at : at + FEED_SIZE]) for at in pieces]
    parts.append(compressor.flush())
    return b"".join(parts)


def make_compressor(compression: Compression, level: int | None = None) -> Compressor:
    """A fresh compressor for one layer; ``level`` None means ``DEFAULT_LEVELS``."""
    if compression not in COMPRESSIONS:
        raise InvalidInput(f"unknown compression {compression!r} (use one of {COMPRESSIONS})")
    chosen = DEFAULT_LEVELS[compression] if level is None else level
    if compression == "gzip":
        return GzipCompressor(chosen)
    if compression == "zstd":
        return ZstdCompressor(chosen)
    return IdentityCompressor()
