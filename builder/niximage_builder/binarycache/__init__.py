"""Nix binary caches, read directly: narinfo, signatures, NAR archives, HTTP (or file) fetches.

A binary cache is plain files (``nix-cache-info``, ``<hash>.narinfo``, ``nar/…``): the
builder reads a closure's references and sizes from narinfo before anything is downloaded,
and packs a layer that storage lacks straight from the NAR stream, with no store write
(docs/architecture.md#binary-caches).

One job a module (each imports only those above it):

- ``nixbase32``: Nix's base-32 hash encoding;
- ``narinfo``: one narinfo → ``NarInfo``; its fingerprint; ed25519 signatures and trusted keys;
- ``nar``: a NAR stream → tar entries whose contents are regions of a spooled copy;
- ``fetch``: one cache over HTTP(S) or file://: cache info, narinfo, NAR streams (netrc,
  xz/zstd/bzip2/none), with every hash and size checked;
- ``closure``: the closure of store paths from the caches' narinfo, in parallel.
"""
