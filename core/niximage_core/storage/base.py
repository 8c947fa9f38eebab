"""The storage interface every backend implements. Imports digest and errors only.

Layout (both backends, docs/architecture.md#storage-layout):

    blobs/sha256/<hex>          layers, configs, manifests: content-addressed, immutable
    layers/<layer key>          JSON metadata of a built layer
    listings/<store path hash>  a requested package's tree, for the top layer (builder.listings)
    builds/<build key>          JSON build result
    tags/<repository>/_tags/<tag>  the manifest digest a tag points at (layout.tag_path)
    tags/_pulls/<repository>/_tags/<tag>  the same, recorded by on-demand pulls
    referrers/<subject>/<artifact>  an artifact (SBOM) about a manifest (niximage_core.referrers)
    owners/<ns>/<name>/<uid>/<tag>  which NixImage a tag is (niximage_operator.ownership)
    revisions/<repository>/_manifests/<hex>  manifests a repository was tagged with
    registry/readiness          never written: the registry's readiness probe reads it

Blobs become visible only complete and verified (``BlobWriter.commit``); metadata objects
are small and replaced atomically. Content types are not stored: a manifest carries its
own ``mediaType`` and every other blob is ``application/octet-stream``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput

# Metadata keys: slash-separated parts of safe characters, no empty, "." or ".." part.
_KEY_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_key(key: str) -> str:
    """Validate a metadata key (``tags/a/b/latest``); hostile keys never reach a backend."""
    parts = key.split("/")
    if len(key) > 1024 or len(parts) < 2 or not all(_KEY_PART.fullmatch(p) for p in parts):
        raise InvalidInput(f"invalid storage key: {key[:200]!r}")
    if parts[0] not in (
        "layers", "builds", "tags", "owners", "revisions", "registry", "gc", "listings",
        "referrers",
    ):  # fmt: skip
        raise InvalidInput(f"invalid storage key prefix: {key[:200]!r}")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix: a key without its tail (``tags/``, ``tags/shell/l``).

    Appending one safe character turns every valid prefix into a valid key and keeps every
    hostile one (``../``, ``tags//``, ``/abs``) invalid. Prefixes match as plain strings,
    as in GCS: ``tags/shell`` also matches ``tags/shell2/…``.
    """
    try:
        check_key(prefix + "x")
    except InvalidInput:
        raise InvalidInput(f"invalid storage key prefix: {prefix[:200]!r}") from None
    return prefix


def is_key(key: str) -> bool:
    """Whether ``key`` is a valid metadata key (listings skip anything else)."""
    try:
        check_key(key)
    except InvalidInput:
        return False
    return True


def blob_key(digest: Digest) -> str:
    return f"blobs/sha256/{digest.hex}"


class BlobWriter(Protocol):
    """A blob being written. Nothing is visible until ``commit`` verified the digest."""

    def write(self, data: bytes) -> None: ...

    def digest(self) -> Digest:
        """sha256 of the bytes written so far: the writer hashes them anyway, to verify at
        commit, so a producer need not hash them a second time."""
        ...

    def commit(self, expected: Digest) -> None:
        """Check the bytes written hash to ``expected``, then publish them atomically.

        Raises ``StorageError`` on a mismatch or a backend failure; the blob stays invisible.
        Publishing a blob that already exists is a success (content addressing).
        """
        ...


@dataclass(frozen=True)
class LocalFile:
    """Serve the blob from this local file (the registry uses ``sendfile``)."""

    path: str


@dataclass(frozen=True)
class Redirect:
    """Send the client to this short-lived URL (a 307): the blob never passes through us."""

    url: str


Delivery = LocalFile | Redirect | None
"""How a blob reaches an HTTP client; None: stream it from ``open_blob``."""


class Storage(Protocol):
    """What the builder, the registry, gc and the operator need from storage: every
    backend implements all of it (tests/storage/test_contract.py checks)."""

    url: str
    """Where this storage lives, e.g. ``/var/lib/niximage`` or ``gs://bucket/prefix``."""

    # blobs
    def blob_size(self, digest: Digest) -> int | None:
        """Size of a committed blob, or None when it does not exist."""
        ...

    def open_blob(self, digest: Digest) -> BinaryIO:
        """Open a committed blob for reading; raises ``NotFound``."""
        ...

    def blob_writer(self) -> AbstractContextManager[BlobWriter]:
        """A writer for a new blob; leaving the block without ``commit`` discards it."""
        ...

    def put_blob(self, data: bytes) -> Digest:
        """Store small bytes (configs, manifests) and return their digest."""
        ...

    def delete_blob(self, digest: Digest) -> None: ...

    def list_blobs(self) -> Iterator[tuple[Digest, int, float]]:
        """Every committed blob: digest, size, modification time (epoch seconds)."""
        ...

    def blob_delivery(self, digest: Digest, url_ttl: int | None) -> Delivery:
        """How to hand the blob to a client: a local file, a redirect to a URL that lives
        ``url_ttl`` seconds (only when one is given and the credentials can sign), or None
        (stream ``open_blob``). Says nothing of existence: the caller still checks."""
        ...

    # metadata
    def read(self, key: str) -> bytes | None:
        """A metadata object, or None when absent."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Create or atomically replace a metadata object."""
        ...

    def write_unless(self, key: str, data: bytes, keep: Callable[[bytes], bool]) -> bool:
        """Write ``data`` unless the object's current value satisfies ``keep``; False when
        it was kept. Atomic with respect to other ``write_unless`` calls on the key: no
        value ``keep`` protects is ever replaced (a build's success by a failure)."""
        ...

    def delete(self, key: str) -> None:
        """Remove a metadata object; absent is fine."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (e.g. ``tags/``), sorted."""
        ...

    def close(self) -> None: ...

    # garbage collection: the primitives of the protocol in the gc package doc.
    # ``touch_blob`` and ``delete_blob_if_stale`` are atomic with respect to each other: a
    # touch that answers a size is never undone by a deletion whose check came before it
    # (the touch waits and answers None, or the deletion answers "fresh"), and a deletion
    # never removes a copy that a writer published after its check. Times are epoch seconds
    # of the clock that stamps the blobs (the kernel's, the GCS servers').

    def touch_blob(self, digest: Digest) -> int | None:
        """Set the blob's modification time to now; its size, or None when it does not exist."""
        ...

    def delete_blob_if_stale(self, digest: Digest, cutoff: float) -> str:
        """Delete the blob unless it was modified (written, touched) at or after ``cutoff``:
        ``"deleted"``, ``"fresh"`` (kept) or ``"missing"``."""
        ...

    def blob_mtime(self, digest: Digest) -> float | None:
        """The blob's current modification time, or None when it does not exist."""
        ...

    def count_stale_uploads(self, older_than: float) -> int:
        """Temporary uploads (crashed writers) older than ``older_than`` seconds."""
        ...

    def purge_stale_uploads(self, older_than: float) -> int:
        """Delete those temporary uploads; how many went.

        ``older_than`` must exceed the longest write: a live writer's upload goes too.
        """
        ...

    def recover_trash(self, cutoff: float) -> int:
        """Settle the deletions a killed gc left half done: a blob modified at or after
        ``cutoff`` is put back, any other finally deleted. How many were put back."""
        ...


def iter_chunks(stream: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk
