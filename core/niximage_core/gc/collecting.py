"""One gc run: ``collect`` marks from the roots, then sweeps in the order of the package doc,
each deletion under rules G1 and G2.

Imports digest, errors, result, units, the storage interface and every gc module but command.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

from niximage_core.checkpoints import checkpoint
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, StorageError
from niximage_core.gc.marking import (
    BlobInfo,
    Marker,
    blob_mtime,
    count_stale_uploads,
    delete_blob_if_stale,
    purge_stale_uploads,
    recover_trash,
)
from niximage_core.gc.reports import Report
from niximage_core.gc.roots import READERS, LeaseRecord, Roots, read_all, read_roots, result_digests
from niximage_core.referrers import link_path, parse_link
from niximage_core.result import BuildResult
from niximage_core.revisions import REVISIONS_ROOT, revision_digest
from niximage_core.storage.base import Storage
from niximage_core.units import format_duration

DEFAULT_GRACE = 3600.0


class GraceTooShort(StorageError):
    """Reading the roots took longer than half the grace period (rule G1): gc stops."""


class _Collector:
    """One gc run: the state that rule G1 keeps fresh."""

    def __init__(self, storage: Storage, grace: float, report: Report) -> None:
        self.storage = storage
        self.grace = grace
        self.report = report
        self.marker = Marker(storage)
        self.blobs: dict[Digest, BlobInfo] = {}
        self.roots: Roots
        self.reachable: set[Digest] = set()
        self.recent: set[str] = set()
        self.lease_keys: set[str] = set()
        self._refreshing = threading.Lock()

    # mark

    def list_blobs(self) -> None:
        self.blobs = {d: BlobInfo(size, mtime) for d, size, mtime in self.storage.list_blobs()}
        checkpoint("gc.listed", count=len(self.blobs))

    def mark(self) -> None:
        """Read the roots (G1) and mark everything they reach."""
        self.roots = read_roots(self.storage)
        now = time.time()
        cutoff = now - self.grace
        manifests: list[Digest] = list(self.roots.tags.values())
        blobs: list[Digest] = []
        self.recent = set()
        for key, result in self.roots.builds.items():
            manifest, *named = result_digests(result)
            if self._recent(manifest, cutoff):
                self.recent.add(key)
                manifests.append(manifest)
                blobs.extend(named)
        live = [lease for lease in self.roots.leases if lease.live(now)]
        for lease in live:
            blobs.extend(lease.digests)
        self.lease_keys = {lease.key for lease in live}
        self.reachable, missing = self.marker.mark(
            manifests, blobs, self.blobs, self.roots.referrers
        )
        self._report_roots(live, missing)
        checkpoint("gc.marked", reachable=len(self.reachable))

    def _recent(self, manifest: Digest, cutoff: float) -> bool:
        info = self.blobs.get(manifest)
        if info is not None:
            return info.mtime >= cutoff
        # Not listed: written after our listing (fresh), or gone.
        return self.storage.blob_size(manifest) is not None

    def _report_roots(self, live: list[LeaseRecord], missing: set[Digest]) -> None:
        report = self.report
        report.tags = len(self.roots.tags)
        report.recent_builds = len(self.recent)
        report.live_leases = len(live)
        report.invalid = sorted(self.roots.invalid + self.roots.broken_leases)
        report.dangling = sorted(
            [f"{key} names missing {d}" for key, d in self.roots.tags.items() if d in missing]
            + [f"{key}: {problem}" for key, problem in self._broken_images()]
            + [
                f"{key} names missing {d}"
                for key in self.recent
                for d in result_digests(self.roots.builds[key])[:1]
                if d in missing
            ]
        )
        listed = [self.blobs[d] for d in self.reachable if d in self.blobs]
        report.reachable = len(listed)
        report.reachable_bytes = sum(info.size for info in listed)

    def _broken_images(self) -> Iterator[tuple[str, str]]:
        """Tags whose manifest exists but names a blob that does not (a diagnostic)."""
        for key, manifest in sorted(self.roots.tags.items()):
            refs = self.marker.references(manifest)  # cached by the marking
            for digest in refs.blobs if refs is not None else ():
                if digest not in self.blobs and self.storage.blob_size(digest) is None:
                    yield key, f"{manifest} names missing {digest}"

    def refresh_if_due(self) -> None:
        """G1: the root read behind any deletion started less than grace/2 ago."""
        if time.monotonic() - self.roots.started <= self.grace / 2:
            return
        self.mark()
        checkpoint("gc.refreshed")
        if time.monotonic() - self.roots.started > self.grace / 2:
            raise GraceTooShort(
                f"reading the roots took longer than half the grace period "
                f"({format_duration(self.grace)}): use a longer --grace"
            )

    # plan

    def candidates(self) -> dict[Digest, int]:
        cutoff = time.time() - self.grace
        return {
            d: info.size
            for d, info in sorted(self.blobs.items())
            if d not in self.reachable and info.mtime < cutoff
        }

    def old_builds(self) -> list[str]:
        cutoff = time.time() - self.grace
        old = []
        for key, result in sorted(self.roots.builds.items()):
            manifest = Digest.parse(result.manifestDigest or "")
            if key in self.recent or manifest in self.reachable:
                continue
            info = self.blobs.get(manifest)
            if info is None or info.mtime < cutoff:
                old.append(key)
        return old

    def dead_layer_entries(self, doomed: Mapping[Digest, int]) -> list[str]:
        """``layers/`` entries whose blob is doomed, missing or unreadable."""
        dead = []
        for key, raw in sorted(read_all(self.storage, self.storage.list("layers/")).items()):
            digest = _layer_digest(raw) if raw is not None else None
            if digest is None or digest in doomed or digest not in self.blobs:
                dead.append(key)
        return dead

    def dead_revisions(self, doomed: Mapping[Digest, int]) -> list[str]:
        """Revision links whose manifest is doomed or missing (or whose key names none)."""
        dead = []
        for key in sorted(self.storage.list(REVISIONS_ROOT)):
            digest = revision_digest(key)
            if digest is None or digest in doomed or digest not in self.blobs:
                dead.append(key)
        return dead

    def dead_referrer_links(self, doomed: Mapping[Digest, int]) -> list[str]:
        """Referrer links whose artifact or subject is doomed or missing."""
        return sorted(
            link_path(subject, referrer)
            for subject, found in self.roots.referrers.items()
            for referrer in found
            if any(d in doomed or d not in self.blobs for d in (subject, referrer))
        )

    def delete_referrer_links(self, keys: list[str]) -> list[str]:
        deleted = []
        for key in keys:
            parsed = parse_link(key)
            # Only if the artifact or its subject is gone now (built again meanwhile?).
            if parsed is not None and all(self.storage.blob_size(d) is not None for d in parsed):
                continue
            self.storage.delete(key)
            deleted.append(key)
        return deleted

    def delete_revisions(self, keys: list[str]) -> list[str]:
        deleted = []
        for key in keys:
            digest = revision_digest(key)
            # Only if the manifest is gone now: it may have been tagged again meanwhile.
            if digest is not None and self.storage.blob_size(digest) is not None:
                continue
            self.storage.delete(key)
            deleted.append(key)
        return deleted

    def expired_leases(self) -> list[str]:
        now = time.time()
        expired = [lease.key for lease in self.roots.leases if not lease.live(now)]
        return sorted(expired + self.roots.broken_leases)

    # sweep

    def delete_builds(self, keys: list[str]) -> list[str]:
        deleted = []
        for key in keys:
            checkpoint("gc.delete-build", key=key)
            self.refresh_if_due()
            raw = self.storage.read(key)
            if raw is None:
                continue
            try:
                result = BuildResult.from_json(raw)
                manifest = result_digests(result)[0]
            except (ValueError, InvalidInput, IndexError):
                continue
            if not self._still_old(key, result, manifest):
                continue
            self.storage.delete(key)
            deleted.append(key)
        return deleted

    def _still_old(self, key: str, result: BuildResult, manifest: Digest) -> bool:
        """Re-check just before deleting: rewritten, referenced or touched since the plan?"""
        if result != self.roots.builds.get(key) or manifest in self.reachable:
            return False
        mtime = blob_mtime(self.storage, manifest)
        return mtime is None or mtime < time.time() - self.grace

    def delete_blobs(self, doomed: Mapping[Digest, int]) -> dict[Digest, int]:
        """Delete in parallel (GCS round trips); each deletion follows G1 and G2 itself."""
        with ThreadPoolExecutor(READERS) as pool:
            outcomes = list(pool.map(self._delete_blob, doomed))
        deleted: dict[Digest, int] = {}
        for (digest, size), outcome in zip(doomed.items(), outcomes, strict=True):
            if outcome == "deleted":
                deleted[digest] = size
            elif outcome == "fresh":
                self.report.spared.append(digest)
        return deleted

    def _delete_blob(self, digest: Digest) -> str:
        checkpoint("gc.before-delete", digest=digest)
        with self._refreshing:
            self.refresh_if_due()
            if digest in self.reachable:
                return "fresh"
            # G2: the cutoff is taken right after the G1 check (the delete's own latency does
            # not matter: the primitive is atomic).
            cutoff = time.time() - self.grace
        outcome = delete_blob_if_stale(self.storage, digest, cutoff)
        checkpoint("gc.after-delete", digest=digest, outcome=outcome)
        return outcome

    def delete_layer_entries(self, keys: list[str]) -> list[str]:
        with ThreadPoolExecutor(READERS) as pool:
            done = list(pool.map(self._delete_layer_entry, keys))
        return [key for key, deleted in zip(keys, done, strict=True) if deleted]

    def _delete_layer_entry(self, key: str) -> bool:
        raw = self.storage.read(key)
        if raw is None:
            return False
        digest = _layer_digest(raw)
        # Only if its blob is gone now: a builder may have packed it again meanwhile.
        if digest is not None and self.storage.blob_size(digest) is not None:
            return False
        self.storage.delete(key)
        return True


def _layer_digest(raw: bytes) -> Digest | None:
    try:
        return Digest.parse(json.loads(raw)["digest"])
    except (ValueError, KeyError, TypeError, InvalidInput):
        return None


def collect(storage: Storage, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> Report:
    """One gc run over ``storage`` (see the package doc); a dry run deletes nothing."""
    if grace <= 0:
        raise InvalidInput("the grace period must be positive")
    started = time.monotonic()
    report = Report(storage.url, dry_run, grace)
    run = _Collector(storage, grace, report)
    if not dry_run:
        report.restored = recover_trash(storage, time.time() - grace)
    run.list_blobs()
    report.blobs_total = len(run.blobs)
    report.bytes_total = sum(info.size for info in run.blobs.values())
    run.mark()
    doomed = run.candidates()
    old_builds = run.old_builds()
    expired = run.expired_leases()
    if dry_run:
        report.blobs = doomed
        report.builds = old_builds
        report.layers = run.dead_layer_entries(doomed)
        report.revisions = run.dead_revisions(doomed)
        report.referrers = run.dead_referrer_links(doomed)
        report.leases = expired
        report.uploads = count_stale_uploads(storage, grace)
    else:
        report.builds = run.delete_builds(old_builds)
        report.blobs = run.delete_blobs(doomed)
        report.layers = run.delete_layer_entries(run.dead_layer_entries(report.blobs))
        report.revisions = run.delete_revisions(run.dead_revisions(report.blobs))
        report.referrers = run.delete_referrer_links(run.dead_referrer_links(report.blobs))
        for key in expired:
            storage.delete(key)
        report.leases = expired
        report.uploads = purge_stale_uploads(storage, grace)
    report.seconds = time.monotonic() - started
    return report
