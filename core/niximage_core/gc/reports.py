"""``Report``: what one gc run found, kept and deleted, as JSON and as text.

Imports digest and units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from niximage_core.digest import Digest
from niximage_core.units import format_bytes, format_duration


@dataclass
class Report:
    storage: str
    dry_run: bool
    grace: float
    tags: int = 0
    recent_builds: int = 0
    live_leases: int = 0
    blobs_total: int = 0
    bytes_total: int = 0
    reachable: int = 0
    reachable_bytes: int = 0
    blobs: dict[Digest, int] = field(default_factory=dict)
    """Deleted (or, in a dry run, to delete): digest → size."""
    spared: list[Digest] = field(default_factory=list)
    """Candidates kept after all: touched or referenced while gc ran."""
    builds: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    revisions: list[str] = field(default_factory=list)
    referrers: list[str] = field(default_factory=list)
    """Referrer links whose artifact or subject went."""
    leases: list[str] = field(default_factory=list)
    uploads: int = 0
    restored: int = 0
    dangling: list[str] = field(default_factory=list)
    """Tags and recent results that name a blob that does not exist."""
    invalid: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(self.blobs.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "dryRun": self.dry_run,
            "graceSeconds": self.grace,
            "roots": {
                "tags": self.tags,
                "recentBuilds": self.recent_builds,
                "liveLeases": self.live_leases,
            },
            "blobsTotal": self.blobs_total,
            "bytesTotal": self.bytes_total,
            "reachable": {"blobs": self.reachable, "bytes": self.reachable_bytes},
            "blobs": [{"digest": str(d), "size": s} for d, s in sorted(self.blobs.items())],
            "bytes": self.bytes,
            "spared": sorted(str(d) for d in self.spared),
            "builds": self.builds,
            "layers": self.layers,
            "revisions": self.revisions,
            "referrers": self.referrers,
            "leases": self.leases,
            "uploads": self.uploads,
            "restored": self.restored,
            "dangling": self.dangling,
            "invalid": self.invalid,
            "seconds": round(self.seconds, 3),
        }

    def render(self, verbose: bool = False) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = [
            f"storage {self.storage}: {self.blobs_total} blobs, {format_bytes(self.bytes_total)}"
            f" (grace {format_duration(self.grace)}{', dry run' if self.dry_run else ''})",
            f"kept: {self.reachable} reachable blobs ({format_bytes(self.reachable_bytes)}) from "
            f"{self.tags} tags, {self.recent_builds} recent builds, {self.live_leases} leases",
            f"{verb}: {len(self.blobs)} blobs ({format_bytes(self.bytes)}), "
            f"{len(self.builds)} build results, {len(self.layers)} layer entries, "
            f"{len(self.revisions)} revision links, {len(self.referrers)} referrer links, "
            f"{len(self.leases)} expired leases, {self.uploads} stale uploads",
        ]
        if self.spared:
            lines.append(f"spared: {len(self.spared)} blobs touched or referenced meanwhile")
        if verbose or self.dry_run:
            lines += [f"  {d}  {format_bytes(s)}" for d, s in sorted(self.blobs.items())]
            lines += [f"  {key}" for key in self.builds]
        lines += [f"warning: {what}" for what in self.dangling]
        return "\n".join(lines)
