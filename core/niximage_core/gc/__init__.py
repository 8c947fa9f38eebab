"""Garbage collection of storage (``niximage gc``), and the protocol that lets it run while
images are being built.

What is kept (mark):

- every manifest a tag names (any key under ``tags/``), and what it references: its config and
  layers, or for an index (OCI index, Docker manifest list) its manifests, recursively;
- every *recent* successful build result ``builds/<key>``, one whose manifest blob was written
  or touched within the grace period: its manifest, config and layers;
- every artifact about a kept manifest (its SBOM: ``referrers/<subject>/<artifact>`` links,
  read with the roots), and what the artifact references;
- every digest a live lease names (``gc/leases/<id>``: a build in progress);
- every blob younger than the grace period, referenced or not.

What goes (sweep), in this order, so that a name goes before what it names:

1. ``builds/<key>`` successes that are not recent and whose manifest no tag or lease reaches.
   Failures stay: they hold no blobs, carry no timestamp, and tell the operator not to retry.
2. Blobs that are not marked and older than the grace period.
3. ``layers/<key>`` entries whose blob is gone (a cache: a wrong deletion costs a repack),
   revision links ``revisions/<repository>/_manifests/<hex>`` whose manifest is gone
   (they are not roots: they only scope pulls by digest to the repositories that had it),
   and referrer links whose artifact or subject is gone.
4. Expired leases, and temporary uploads older than the grace period (crashed writers).

``--dry-run`` marks and lists what the sweep would delete, deleting nothing.

The protocol
============

Two primitives per backend (``touch_blob``, ``delete_blob_if_stale``: methods of the
backend, ``storage.base.Storage``), atomic with respect to each other:

- *touch(d)* sets d's modification time to now, or answers "missing". Filesystem: ``utime``
  under a shared ``flock`` of the blob file, after checking that the path still names the
  locked file. GCS: a metadata patch of ``customTime`` to now (a new metageneration; the
  generation and the bytes stay, so a streamed read of the blob runs on).
- *delete_if_stale(d, cutoff)* deletes d only if its mtime is older than ``cutoff``.
  Filesystem: exclusive ``flock``, check, rename into ``tmp/``, check that the renamed file is
  the one checked (else put it back), unlink. GCS: read generation, metageneration and the
  times, then delete with ``ifGenerationMatch`` and ``ifMetagenerationMatch``: a touch in
  between made a new metageneration, and the delete fails.

Rules for writers (``build.py`` follows them):

- W1 A build takes a lease before it reuses or writes a blob, adds each digest as it relies on
  it, flushes within a second, refreshes every ttl/4, and deletes the lease when done.
- W2 Reusing a blob means touching it; "missing" means packing it again.
- W3 After writing config and manifest, the build touches every blob the manifest names and
  packs or puts again whatever is missing, until a pass finds everything; then it records
  ``builds/<key>`` and returns.
- W4 ``cached_result`` touches the blobs of the result it returns. ``record_tag`` touches them
  after writing the tag, the manifest first; if one is missing it fails, and puts the old
  value back only after touching that image too (while the tag named the new image, the old
  one was unreferenced), else deletes the tag.

Rules for gc:

- G1 List blobs, then read the roots (tags, builds, leases). Before each deletion, if the last
  root read *started* more than grace/2 ago (monotonic clock), read them again and mark again;
  a read that itself outlasts grace/2 aborts the run.
- G2 Delete a blob only if the latest marking does not reach it, and only through
  delete_if_stale with ``cutoff = now - grace`` taken after the G1 check.
- G3 Any error reading a root or a manifest aborts the run: it is never taken for "no
  references".

Assumption A: gc's clock and the clock that stamps mtimes (the kernel; GCS's servers) agree to
well within grace/2.

Claim 1: once ``record_tag`` (tag → m) returned, every blob of m's image exists for as long
as the tag names m. record_tag wrote the tag at W, then touched m at P_m, then each other blob
d at P_d ≥ P_m, all successfully. Suppose one of them is deleted after its touch; take the
earliest such deletion, of d by a gc run G. By atomicity G's check came after P_d and saw
mtime ≥ P_d; it deleted, so P_d < cutoff = now - grace, and by G1 the root read R behind the
deletion started after now - grace/2, so W ≤ P_m ≤ P_d < R. G read the tag and found m; m
existed when G read it after R (it existed at P_m, and any later deletion of m would be an
earlier one than d's), so G read it (G3: an error aborts) and marked d: G2 forbids the
deletion. (m is touched first for exactly this step; manifests are immutable, so reading a
cached parse is as good, and a "missing" answer is never cached.)

Claim 2: a result that ``build_image`` or ``cached_result`` returns names only blobs that
exist, and no gc deletes any of them within the grace period after that (long enough for the
caller to write a tag, and ``record_tag`` checks again). The last pass of W3 (or W4's touch)
touched each blob at P with it present; a later deletion needs a check that sees mtime < now -
grace, i.e. comes more than grace after P; an earlier one would have made the touch fail.

Orderings of a build B and a gc G, and what makes each safe:

1. G reads leases after B's lease listed d: d is marked, nothing of B is deleted.
2. G read leases before B's lease and deletes d (an old layer of an image whose tag was
   deleted) before B touches it: B's touch says missing, B packs d again. The new file or
   object is fresh, and G's earlier check does not cover it (new inode, new generation).
3. B touches d between G's check and G's delete: the primitives are atomic (the flock, the
   metageneration precondition): d stays.
4. B touched d before G's check: d is fresh, and G spares it.
5. B wrote or touched d more than the grace period ago and its lease expired or was never read
   (B paused): G may delete d. B's verify (W3), after the manifest is written and before
   anything durable names it, finds d missing and packs or puts it again.
6. G deletes d after B's verify: not within the grace period (4, 3); after that the result is
   tagged (claim 1) or it is the old, untagged garbage gc exists for, and ``cached_result``
   touches and checks again before anyone reuses it.
7. The caller tags a result more than the grace period after the build (ordering 6 took a
   blob): ``record_tag``'s touch fails, and it puts the old value back only after touching
   that image whole: while the tag named the new image, the old one was garbage too.

So leases are not needed for safety: they spare long builds (longer than the grace period)
the repacking of step 5, and they keep a build's blobs out of ``--dry-run`` listings.

Limits, said plainly:

- GCS: the server must honour ``ifMetagenerationMatch`` on DELETE. Google Cloud Storage does;
  fake-gcs-server ignores it (and keeps the metageneration on a patch), so there ordering 3
  can lose a blob touched in that window of one request. On such a server the tests skip the test of
  the primitive and, elsewhere, make touch and delete exclusive in-process instead.
- Filesystem: a blob file the builder may not ``utime`` (another user's) keeps its mtime, and
  claim 1 does not hold for it (only leases and verify protect it): run builders and gc as
  the user that owns the store. A gc killed between its rename and its unlink
  leaves ``tmp/gc-*``; the next run restores such a file if it is fresh and deletes it if not.
- Temporary uploads older than the grace period are deleted, so the grace period must exceed
  the longest single blob upload; a killed upload fails its build, it never becomes a blob.
- Tag writers that bypass ``record_tag`` (the on-demand registry, tagging a result another
  request built a moment ago) rely on that build's verify being seconds old.
- GCS: ``customTime`` only moves forward, so a touch by a writer whose clock is behind one
  that touched last is a no-op (assumption A bounds the difference).

The package, one job a module (each imports only those above it):

- (``niximage_core.checkpoints``: ``checkpoint``, the test hook at the protocol's
  decision points, outside the package so that the storage backends can use it;)
- ``roots``: what gc keeps: storage round trips a few at a time (``READERS``), ``Lease``
  for builds and ``read_leases`` for gc, ``read_roots`` (tags, builds, leases) and
  ``result_digests``;
- ``marking``: what a manifest names, the ``Marker`` that follows it from the roots, and
  the primitives on one blob, dispatched to the storage's own (``touch_blob``,
  ``delete_blob_if_stale``, ``blob_mtime``, ``recover_trash``, stale uploads), with
  ``touch_all`` and ``touch_image``;
- ``reports``: ``Report``, what a run did;
- ``collecting``: ``collect``, one run;
- ``command``: ``niximage gc`` (``add_arguments``, ``run``, ``main``; ``__main__`` for
  ``python -m niximage_core.gc``).

Together they import digest, errors, result, units and the storage interface (the storage
factory only when ``run`` runs): no backend. The backends implement the primitives
(``storage.filesystem``, ``storage.gcs``) and mark their checkpoints through the
project-wide ``niximage_core.checkpoints``, which imports nothing.

This ``__init__`` only re-exports: ``from niximage_core import gc`` then ``gc.collect`` is
the way in. The names are for reading and calling; a test that patches one patches where it
is read: the module (``checkpoints.CHECKPOINT``, ``gc.roots.LEASE_FLUSH``) or, for a
primitive, the backend class (``GcsStorage.touch_blob``).
"""

from niximage_core.checkpoints import Checkpoint, checkpoint
from niximage_core.gc.collecting import DEFAULT_GRACE, GraceTooShort, collect
from niximage_core.gc.command import add_arguments, main, run
from niximage_core.gc.marking import (
    MANIFEST_LIMIT,
    BlobInfo,
    Marker,
    References,
    blob_mtime,
    count_stale_uploads,
    delete_blob_if_stale,
    manifest_references,
    purge_stale_uploads,
    recover_trash,
    touch_all,
    touch_blob,
    touch_image,
)
from niximage_core.gc.reports import Report
from niximage_core.gc.roots import (
    LEASE_FLUSH,
    LEASE_PREFIX,
    LEASE_TTL,
    READERS,
    Lease,
    LeaseRecord,
    Roots,
    read_leases,
    read_roots,
    result_digests,
)

__all__ = [
    "DEFAULT_GRACE",
    "LEASE_FLUSH",
    "LEASE_PREFIX",
    "LEASE_TTL",
    "MANIFEST_LIMIT",
    "READERS",
    "BlobInfo",
    "Checkpoint",
    "GraceTooShort",
    "Lease",
    "LeaseRecord",
    "Marker",
    "References",
    "Report",
    "Roots",
    "add_arguments",
    "blob_mtime",
    "checkpoint",
    "collect",
    "count_stale_uploads",
    "delete_blob_if_stale",
    "main",
    "manifest_references",
    "purge_stale_uploads",
    "read_leases",
    "read_roots",
    "recover_trash",
    "result_digests",
    "run",
    "touch_all",
    "touch_blob",
    "touch_image",
]
