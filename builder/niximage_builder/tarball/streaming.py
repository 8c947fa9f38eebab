"""The streaming pipeline of one layer: tar bytes → sha256 (diffID) → compressor → sha256
(digest) and byte count → sink, in fixed blocks; plus what a packed layer is known by.

Reads only the descriptors it is given and writes only to the sink; imports compression,
digest, entries (for ``PackError``) and headers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Protocol

from niximage_builder.compression import (
    DEFAULT_LEVELS,
    OCI_LAYER_MEDIA_TYPES,
    Compression,
    Compressor,
)
from niximage_builder.tarball.entries import PackError
from niximage_builder.tarball.headers import ZEROS
from niximage_core.digest import Digest

BLOCK_SIZE = 1 << 20
"""Bytes hashed and compressed at a time. Big enough that the GIL is released for nearly all
of the work, small enough that a few parallel layers stay far below 100 MB of memory."""

FORMAT_VERSION = 1
"""Bumped whenever the same files would give other tar bytes (order, modes, headers)."""


class SupportsWrite(Protocol):
    """Where compressed layer bytes go: a storage ``BlobWriter``, a file, a test buffer."""

    def write(self, data: bytes, /) -> object: ...


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
    """What decides a layer's bytes besides its files, for the layer key
    (docs/architecture.md#identity-and-caching):
    ``tar1+gzip-2``. The compression library's version is left out on purpose: a cached
    layer stays valid (its metadata names its own digest) even if a newer library would
    compress the same tar to other bytes."""
    chosen = DEFAULT_LEVELS[compression] if level is None else level
    return f"tar{FORMAT_VERSION}+{compression}-{chosen}"


class LayerStream:
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
        self.write(ZEROS)
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
