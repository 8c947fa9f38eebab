"""The streaming pipeline of one layer: tar bytes → sha256 (diffID) → chunks compressed on
every core → sha256 (digest) and byte count → sink, in order; plus what a packed layer is
known by.

One pass over the data: the tar bytes are hashed as each chunk fills, the compressed bytes
as they leave for the sink. Chunks (``compression.CHUNK_SIZE`` of tar at fixed offsets)
compress in a thread pool shared by every layer of the process, a few at a time per layer,
so one big store path uses all cores and memory stays bounded (``PIPELINE_DEPTH`` chunks in
flight per layer).

Reads only the descriptors it is given and writes only to the sink; imports compression,
digest, entries (for ``PackError``) and headers.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from niximage_builder.compression import (
    CHUNK_SIZE,
    DEFAULT_LEVELS,
    OCI_LAYER_MEDIA_TYPES,
    Compression,
    compress_chunk,
)
from niximage_builder.tarball.entries import PackError
from niximage_builder.tarball.headers import ZEROS
from niximage_core.digest import Digest
from niximage_core.threads import process_pool

BLOCK_SIZE = CHUNK_SIZE
"""Tar bytes assembled, hashed and handed to the compressors at a time: one chunk."""
PIPELINE_DEPTH = 4
"""Chunks of one layer compressing at once at most (16 MiB of tar, and their output)."""

FORMAT_VERSION = 2
"""Bumped whenever the same files would give other bytes (order, modes, headers, chunks).
2: compressed in chunks of ``CHUNK_SIZE``."""


class SupportsWrite(Protocol):
    """Where compressed layer bytes go: a storage ``BlobWriter``, a file, a test buffer."""

    def write(self, data: bytes, /) -> object: ...


@runtime_checkable
class HashingSink(Protocol):
    """A sink that hashes what it is given (every storage ``BlobWriter``, to verify at
    commit): the layer's digest is then its hash, and the bytes are hashed once."""

    def write(self, data: bytes, /) -> object: ...

    def digest(self) -> Digest: ...


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
    ``tar2+gzip-2``. The compression library's version is left out on purpose: a cached
    layer stays valid (its metadata names its own digest) even if a newer library would
    compress the same tar to other bytes."""
    chosen = DEFAULT_LEVELS[compression] if level is None else level
    return f"tar{FORMAT_VERSION}+{compression}-{chosen}"


class LayerStream:
    """Tar bytes in, compressed bytes out to the sink; both sides hashed and counted.

    Tar bytes fill one chunk and go on only as whole chunks (the last one excepted), so the
    compressed output is a function of the tar bytes alone: not of file sizes, read sizes
    or threads. ``pool`` None compresses in this thread, with the same bytes.
    """

    def __init__(
        self,
        sink: SupportsWrite,
        compression: Compression,
        level: int | None = None,
        pool: Executor | None = None,
    ) -> None:
        self._sink = sink
        self._compress = functools.partial(compress_chunk, compression, level)
        self._pool = pool
        self._pending: deque[Future[bytes]] = deque()
        self._new_block()
        self._diff_id = hashlib.sha256()
        self._digest = None if isinstance(sink, HashingSink) else hashlib.sha256()
        self.tar_size = 0
        self.size = 0

    def _new_block(self) -> None:
        # A fresh buffer per chunk: the full one is handed to a compressor, not copied.
        self._block = bytearray(BLOCK_SIZE)
        self._view = memoryview(self._block)
        self._pos = 0

    def write(self, data: bytes) -> None:
        """Append small bytes (headers, padding, inline files)."""
        view = memoryview(data)
        while view:
            take = min(BLOCK_SIZE - self._pos, len(view))
            self._view[self._pos : self._pos + take] = view[:take]
            self._pos += take
            view = view[take:]
            if self._pos == BLOCK_SIZE:
                self._emit()

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
                self._emit()

    def _emit(self) -> None:
        chunk = self._view[: self._pos]
        self._diff_id.update(chunk)
        self.tar_size += len(chunk)
        self._new_block()
        if self._pool is None:
            self._output(self._compress(chunk))
            return
        self._pending.append(self._pool.submit(self._compress, chunk))
        while len(self._pending) > PIPELINE_DEPTH:
            self._output(self._pending.popleft().result())

    def _output(self, data: bytes) -> None:
        if data:
            if self._digest is not None:
                self._digest.update(data)
            self.size += len(data)
            self._sink.write(data)

    def finish(self, compression: Compression) -> PackedLayer:
        """End the archive, compress the last chunk; the sink has every byte afterwards."""
        self.write(ZEROS)
        if self._pos:
            self._emit()
        while self._pending:
            self._output(self._pending.popleft().result())
        if self._digest is None:
            assert isinstance(self._sink, HashingSink)
            digest = self._sink.digest()
        else:
            digest = Digest(self._digest.hexdigest())
        return PackedLayer(
            diff_id=Digest(self._diff_id.hexdigest()),
            digest=digest,
            size=self.size,
            tar_size=self.tar_size,
            compression=compression,
        )


def compression_pool() -> ThreadPoolExecutor:
    """The process's compression threads, one per core (``NIXIMAGE_PACK_THREADS`` to
    choose)."""
    threads = int(os.environ.get("NIXIMAGE_PACK_THREADS") or os.cpu_count() or 1)
    return process_pool("niximage-compress", threads)
