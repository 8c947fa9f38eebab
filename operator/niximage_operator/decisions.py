"""What to do next for one NixImage, from what is known about its build. Pure.

Imports specs, observations and the builder's result model. The operator is level-based:
every reconcile looks at the stored result, the builder pods of the build key and the
attempts made so far, and picks one of five answers. Nothing here remembers anything,
so a restarted operator decides exactly as the one before it would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from niximage_core.result import BuildResult
from niximage_operator.observations import REASONS, BuildFailure, PodObservation, failure
from niximage_operator.specs import Target


@dataclass(frozen=True)
class World:
    """Everything a decision depends on."""

    target: Target
    result: BuildResult | None
    """A successful result stored under the key, with its manifest present."""
    stored_failure: BuildFailure | None
    """A failure the builder recorded under the key (pinned sources only)."""
    pods: tuple[PodObservation, ...]
    """Builder pods of the key in the target's namespace, every attempt."""
    previous_attempts: int
    """``status.attempts`` when the status is about this key, else 0."""
    now: datetime


@dataclass(frozen=True)
class UseResult:
    """The image exists: tag it, report it."""

    result: BuildResult
    pod: PodObservation | None
    attempts: int


@dataclass(frozen=True)
class Wait:
    """A builder pod is pending or running; its events will bring us back."""

    pod: PodObservation
    attempts: int


@dataclass(frozen=True)
class Start:
    """Create builder pod attempt ``attempt`` (when a build slot is free)."""

    attempt: int
    after: BuildFailure | None
    """The transient failure of the previous attempt, if any."""


@dataclass(frozen=True)
class Backoff:
    """A transient failure: try again in ``delay`` seconds."""

    failure: BuildFailure
    pod: PodObservation
    attempts: int
    delay: float


@dataclass(frozen=True)
class Fail:
    """No image for this spec until the spec changes."""

    failure: BuildFailure
    pod: PodObservation | None
    attempts: int


Decision = UseResult | Wait | Start | Backoff | Fail


def latest_pod(pods: Iterable[PodObservation]) -> PodObservation | None:
    return max(pods, key=lambda pod: pod.attempt, default=None)


def decide(world: World, max_attempts: int, backoff: Callable[[int], float]) -> Decision:
    """The next step; ``backoff(n)`` is the pause after ``n`` failed attempts."""
    key = world.target.key
    latest = latest_pod(world.pods)
    attempts = max(world.previous_attempts, latest.attempt if latest else 0)
    succeeded = latest is not None and latest.phase == "Succeeded"
    # An unpinned source (a channel) may have moved on: only a build of this very pod counts.
    if world.result is not None and (world.target.pinned or succeeded):
        return UseResult(world.result, latest, attempts)
    if latest is None:
        stored = world.stored_failure
        if stored is not None and (not stored.transient or attempts >= max_attempts):
            return Fail(stored, None, attempts)
        return Start(attempts + 1, None)
    problem = failure(latest, key)
    if problem is None and not succeeded:
        return Wait(latest, attempts)
    if problem is None:
        problem = BuildFailure(
            "StorageError",
            f"builder pod {latest.name} succeeded, but storage holds no usable result "
            f"under builds/{key}",
            transient=True,
        )
    if not problem.transient:
        return Fail(problem, latest, attempts)
    if attempts >= max_attempts:
        gave_up = f"{problem.message} (gave up after {attempts} attempts)"
        return Fail(BuildFailure(problem.reason, gave_up, False, problem.missing), latest, attempts)
    finished = latest.finished_at or latest.created_at or world.now
    delay = (finished + timedelta(seconds=backoff(attempts)) - world.now).total_seconds()
    if delay > 0:
        return Backoff(problem, latest, attempts, delay)
    return Start(attempts + 1, problem)


def stored_failure(result: BuildResult | None) -> BuildFailure | None:
    """The failure a builder recorded in ``builds/<key>``, as a condition reason."""
    if result is None or result.ok or result.error is None:
        return None
    error = result.error
    return BuildFailure(
        error.kind if error.kind in REASONS else "BuildFailed",
        error.message,
        transient=error.transient,
        missing=tuple(error.missingPackages),
    )
