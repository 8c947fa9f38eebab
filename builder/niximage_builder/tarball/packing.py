"""Packing one layer: entries or absolute paths → tar headers and file contents → the
streaming pipeline → a sink; ``LayerJob`` describes one such layer.

Opens and reads the files named by entries; imports compression and the other tarball
modules but not parallel or workers.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from niximage_builder.compression import Compression
from niximage_builder.tarball.entries import Entry, PackError
from niximage_builder.tarball.headers import RECORD, ZEROS, tar_header
from niximage_builder.tarball.scanning import normalize, scan_paths
from niximage_builder.tarball.streaming import (
    LayerStream,
    PackedLayer,
    SupportsWrite,
    compression_pool,
)

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _write_entry(stream: LayerStream, entry: Entry) -> None:
    stream.write(tar_header(entry))
    if entry.kind != "file":
        return
    if entry.data is not None:
        stream.write(entry.data)
    else:
        _copy_source(stream, entry)
    stream.write(ZEROS[: -entry.size % RECORD])


def _copy_source(stream: LayerStream, entry: Entry) -> None:
    """Copy a file's bytes; it must still be the regular file of the size scanned (the
    header with that size is already written), and FIFOs must not block us."""
    path = entry.source or ""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        raise PackError(f"{path}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if entry.offset is None:
            fits = st.st_size == entry.size
        else:  # a region of a spooled NAR
            fits = st.st_size >= entry.offset + entry.size
            os.lseek(fd, entry.offset, os.SEEK_SET)
        if not stat.S_ISREG(st.st_mode) or not fits:
            raise PackError(f"{path}: changed while it was being packed")
        stream.copy_file(fd, entry.size, path)
    except OSError as err:
        raise PackError(f"{path}: {err.strerror}") from err
    finally:
        os.close(fd)


def pack_normalized(
    entries: Iterable[Entry],
    sink: SupportsWrite,
    compression: Compression = "gzip",
    level: int | None = None,
) -> PackedLayer:
    """Pack entries that ``normalize`` (or ``scan_paths``) already gave, in their order."""
    stream = LayerStream(sink, compression, level, compression_pool())
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
    return pack_normalized(normalize(entries), sink, compression, level)


def pack_paths(
    paths: Sequence[str],
    sink: SupportsWrite,
    compression: Compression = "gzip",
    level: int | None = None,
) -> PackedLayer:
    """Pack absolute paths (store paths, or any directories and files) into one layer.

    Writes the compressed blob to ``sink``; the caller commits it with ``packed.digest``.
    """
    return pack_normalized(scan_paths(paths), sink, compression, level)


@dataclass(frozen=True)
class LayerJob:
    """One layer to pack: store paths (or entries) and a sink."""

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
