"""decisions: the next step for a NixImage, from storage, pods and attempts. A table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from operator_samples import body, pod, settings, target, terminated

from niximage_core.result import BuildError, BuildResult
from niximage_operator import decisions, observations, specs
from niximage_operator.decisions import Backoff, Fail, Start, UseResult, Wait, World
from niximage_operator.observations import BuildFailure

TARGET = target()
KEY = TARGET.key
FINISHED = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)  # samples.terminated's finishedAt
RESULT = BuildResult(buildKey=KEY, spec={}, ok=True, manifestDigest="sha256:" + "a" * 64)
CONFIG = settings(max_attempts=3, retry_delay=10, retry_max_delay=100)


def observed(
    attempt: int = 1, phase: str = "Pending", message: str = "", exit_code: int = 1
) -> observations.PodObservation:
    ended = terminated(exit_code, message) if phase in ("Succeeded", "Failed") else None
    observation = observations.observe(pod(KEY, attempt, phase, ended))
    assert observation is not None
    return observation


def missing() -> str:
    message = "packages not found: nope"
    return json.dumps(
        {
            "buildKey": KEY,
            "ok": False,
            "kind": "MissingPackages",
            "message": message,
            "missingPackages": ["nope"],
        }
    )


def timeout() -> str:
    return json.dumps({"buildKey": KEY, "ok": False, "kind": "Timeout", "message": "too slow"})


def decide(
    *pods: observations.PodObservation,
    result: BuildResult | None = None,
    stored: BuildFailure | None = None,
    previous: int = 0,
    now: datetime = FINISHED + timedelta(seconds=1),
    resolved: specs.Target = TARGET,
) -> decisions.Decision:
    world = World(resolved, result, stored, tuple(pods), previous, now)
    return decisions.decide(world, CONFIG.max_attempts, CONFIG.retry_backoff)


def test_a_stored_result_wins_for_a_pinned_source() -> None:
    assert decide(result=RESULT) == UseResult(RESULT, None, 0)
    running = observed(phase="Running")
    assert decide(running, result=RESULT) == UseResult(RESULT, running, 1)


def test_an_unpinned_source_trusts_only_its_own_finished_pod() -> None:
    moving = body(packageSource={"type": "nixpkgs", "channel": "main"})
    channel = specs.resolve(moving, specs.PackageSources.configure("nixpkgs:main"))
    assert decide(result=RESULT, resolved=channel) == Start(1, None)
    done = observed(phase="Succeeded", exit_code=0)
    assert decide(done, result=RESULT, resolved=channel) == UseResult(RESULT, done, 1)


def test_no_pod_no_result_starts_attempt_one_or_the_next() -> None:
    assert decide() == Start(1, None)
    assert decide(previous=2) == Start(3, None)


def test_a_running_or_pending_pod_is_waited_for() -> None:
    for phase in ("Pending", "Running"):
        current = observed(phase=phase)
        assert decide(current) == Wait(current, 1)


def test_the_latest_attempt_counts() -> None:
    old = observed(1, "Failed", timeout())
    new = observed(2, "Running")
    assert decide(old, new) == Wait(new, 2)


def test_a_permanent_failure_is_final() -> None:
    failed = observed(phase="Failed", message=missing(), exit_code=2)
    decision = decide(failed)
    assert isinstance(decision, Fail) and decision.failure.missing == ("nope",)
    assert decision.failure.reason == "MissingPackages" and decision.attempts == 1


def test_a_transient_failure_backs_off_then_starts_the_next_attempt() -> None:
    failed = observed(phase="Failed", message=timeout())
    early = decide(failed, now=FINISHED + timedelta(seconds=4))
    assert isinstance(early, Backoff) and early.delay == pytest.approx(6)
    assert early.failure.reason == "Timeout" and early.attempts == 1
    late = decide(failed, now=FINISHED + timedelta(seconds=11))
    assert isinstance(late, Start) and late.attempt == 2 and late.after == early.failure


def test_backoff_doubles_per_attempt() -> None:
    second = observed(2, "Failed", timeout())
    decision = decide(second, now=FINISHED)
    assert isinstance(decision, Backoff) and decision.delay == pytest.approx(20)


def test_attempts_run_out() -> None:
    third = observed(3, "Failed", timeout())
    decision = decide(third, now=FINISHED + timedelta(hours=1))
    assert isinstance(decision, Fail) and not decision.failure.transient
    assert "gave up after 3 attempts" in decision.failure.message


def test_a_success_without_a_stored_result_is_a_storage_problem() -> None:
    done = observed(phase="Succeeded", exit_code=0)
    decision = decide(done)
    assert isinstance(decision, Backoff) and decision.failure.reason == "StorageError"


def test_a_recorded_permanent_failure_needs_no_new_pod() -> None:
    error = BuildError(
        kind="MissingPackages", message="packages not found: nope", missingPackages=["nope"]
    )
    recorded = BuildResult(buildKey=KEY, spec={}, ok=False, error=error)
    stored = decisions.stored_failure(recorded)
    assert stored == BuildFailure("MissingPackages", "packages not found: nope", False, ("nope",))
    assert decide(stored=stored) == Fail(stored, None, 0)
    transient = BuildFailure("StorageError", "x", transient=True)
    assert decide(stored=transient) == Start(1, None)
    assert decide(stored=transient, previous=3) == Fail(transient, None, 3)
    assert decisions.stored_failure(RESULT) is None and decisions.stored_failure(None) is None
