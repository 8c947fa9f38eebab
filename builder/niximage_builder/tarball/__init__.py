"""Deterministic layer tarballs, written in one streaming pass
(docs/architecture.md#identity-and-caching).

    entries ─► tar bytes ─► sha256 (diffID) ─► compressor ─► sha256 (digest), byte count ─► sink

Nothing of layer size is ever held in memory or on disk: tar bytes are assembled in
fixed blocks of one chunk (``BLOCK_SIZE``, 4 MiB); file contents are read straight into
them; each full block is hashed, compressed in the process's compression threads as a
gzip member or zstd frame of its own (a few per layer at once: one big store path uses
every core), and the compressed bytes go, in order, to the sink, e.g. a storage
``BlobWriter``. The caller then calls ``sink.commit(packed.digest)``. The builder packs
several layers at once, in threads (``build.assemble``).

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

The package, one job a module (each imports only those above it):

- ``entries``: ``Entry`` and ``PackError``, the values everything else passes around;
- ``scanning``: absolute paths → sorted, de-duplicated entries with their ancestors;
- ``headers``: one entry → its ustar (and PAX) header bytes;
- ``streaming``: tar bytes → hashes, compressor and sink, in fixed blocks → ``PackedLayer``;
- ``packing``: one layer (``pack_paths``, ``pack_entries``, ``LayerJob``);

This ``__init__`` only re-exports: ``from niximage_builder import tarball`` then
``tarball.pack_paths`` is the way in.
"""

from niximage_builder.tarball.entries import Entry, EntryKind, PackError
from niximage_builder.tarball.headers import MTIME, tar_header
from niximage_builder.tarball.packing import LayerJob, pack_entries, pack_normalized, pack_paths
from niximage_builder.tarball.scanning import ANCESTOR_MODE, entry_from_stat, normalize, scan_paths
from niximage_builder.tarball.streaming import (
    BLOCK_SIZE,
    FORMAT_VERSION,
    PackedLayer,
    SupportsWrite,
    layer_format,
)

__all__ = [
    "ANCESTOR_MODE",
    "BLOCK_SIZE",
    "FORMAT_VERSION",
    "MTIME",
    "Entry",
    "EntryKind",
    "LayerJob",
    "PackError",
    "PackedLayer",
    "SupportsWrite",
    "entry_from_stat",
    "layer_format",
    "normalize",
    "pack_entries",
    "pack_normalized",
    "pack_paths",
    "scan_paths",
    "tar_header",
]
