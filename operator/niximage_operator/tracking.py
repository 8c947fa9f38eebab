"""Following a moving package source (``spec.follow``): which reference moves, when to look
again, the source a revision pins, and the history kept in the status. Pure.

Imports the core's resource, sources and units. The operator resolves the reference with
``gitremote`` in its follow loop (running.py), writes the commit to ``status.follow.revision``, and
the reconcile builds ``spec`` with the source pinned to that commit: a new revision is a new
build key, built and cached like any pinned source, and the tag moves only when its build
succeeds (docs/architecture.md#following-a-package-source).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from niximage_core.errors import InvalidInput
from niximage_core.resource import Follow
from niximage_core.sources import GitSource, NixpkgsSource, PathSource
from niximage_core.units import format_duration

Source = PathSource | NixpkgsSource | GitSource
NIXPKGS_GIT = "https://github.com/NixOS/nixpkgs.git"


@dataclass(frozen=True)
class Reference:
    """A git repository's ref that moves: what ``git ls-remote`` resolves."""

    url: str
    ref: str
    """``main``, ``refs/heads/nixos-24.05``; ``HEAD`` for a git source that names none."""


def moving_reference(source: Source, nixpkgs_git: str = NIXPKGS_GIT) -> Reference | None:
    """The reference ``source`` follows, or None for a pinned source (a commit, a path)."""
    if isinstance(source, GitSource) and source.rev is None:
        return Reference(source.url, source.ref or "HEAD")
    if isinstance(source, NixpkgsSource) and not source.pinned:
        # A channel is a branch of nixpkgs' repository (as status.nixos.org lists them).
        return Reference(nixpkgs_git, f"refs/heads/{source.channel}")
    return None


def check(follow: Follow, source: Source, minimum: float) -> None:
    """Refuse a ``spec.follow`` the operator cannot honour, saying why."""
    if not follow.enabled:
        return
    if moving_reference(source) is None:
        raise InvalidInput(
            f"spec.follow: package source {source} does not move (a commit or a path); "
            "follow a git ref or a nixpkgs channel, or remove spec.follow"
        )
    if follow.interval_seconds < minimum:
        raise InvalidInput(
            f"spec.follow.interval {follow.interval} is below the operator's minimum of "
            f"{format_duration(minimum)}"
        )


def pinned(source: Source, revision: str) -> Source:
    """``source`` at ``revision`` (a commit its reference resolved to)."""
    if isinstance(source, GitSource):
        return GitSource(url=source.url, rev=revision)
    if isinstance(source, NixpkgsSource):
        return NixpkgsSource(channel=revision)
    raise InvalidInput(f"package source {source} has no revisions")


def due(state: Mapping[str, Any], source: Source, interval: float, now: datetime) -> bool:
    """Whether the reference should be resolved again: ``status.follow.checkedAt`` is
    ``interval`` or more ago or was never set, or the state is another source's."""
    checked = parse_time(state.get("checkedAt"))
    if checked is None or state.get("source") != str(source):
        return True
    return (now - checked).total_seconds() >= interval


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def with_entry(
    history: Sequence[Mapping[str, Any]], entry: Mapping[str, Any], limit: int
) -> list[dict[str, Any]] | None:
    """``history`` with ``entry`` first (newest first), at most ``limit`` long; None when
    its newest entry already says the same (same revision and outcome)."""
    newest = history[0] if history else {}
    same = ("revision", "outcome", "digest")
    if all(newest.get(k) == entry.get(k) for k in same):
        return None
    rest = [dict(e) for e in history if e.get("revision") != entry.get("revision")]
    return [dict(entry), *rest][:limit]
