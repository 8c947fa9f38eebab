"""Deterministic layer compressors: gzip (ISA-L), zstd, or none. Pure; imports errors only.

Every compressor is a small streaming object (``compress(block) -> bytes``, then ``flush()``)
whose output is a function of the input bytes alone: no timestamps, names or host details.
The tar writer feeds it fixed-size blocks, so the output does not depend on how files happen
to be read either. ISA-L and zstd release the GIL while they work on a block, which is what
lets layers be packed in parallel by threads.

Levels (measured on ELF + text trees, ``benchmarks/pack.py``):

- gzip: ISA-L level 2. About 13× faster than ``gzip -6`` per core, output about 1.12× its
  size. Level 1 is both slower and bigger than 2 on this data, level 3 is less than half as
  fast for about 1 % less size, level 0 is 1.3× bigger than ``gzip -6``.
- zstd: level 3, zstd's own default: about 7× faster than ``gzip -6`` per core and 5 %
  smaller than it. No checksum and no content size in the frame (a stream's size is unknown
  when the frame starts; layer digests already protect the bytes).
"""

from __future__ import annotations

import struct
from typing import Literal, Protocol

import zstandard
from isal import isal_zlib

from niximage_builder.errors import InvalidInput

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
