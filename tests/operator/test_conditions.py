"""conditions: status reports, condition transitions, patches and events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from operator_samples import pod, target, terminated

from niximage_core.result import BuildResult, LayerResult
from niximage_operator import conditions, observations
from niximage_operator.conditions import Condition, Report
from niximage_operator.observations import BuildFailure

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
TARGET = target(tag="1.0")
DIGEST = "sha256:" + "d" * 64


def layer(size: int, paths: int, reused: bool = False) -> LayerResult:
    return LayerResult(
        digest="sha256:" + f"{size:064x}",
        diffId="sha256:" + "0" * 64,
        size=size,
        narSize=size * 3,
        paths=[f"/nix/store/{i}" for i in range(paths)],
        reused=reused,
    )


SIZES = [(100, 1), (5000, 3), (200, 2), (900, 1), (700, 4), (800, 1), (50, 9)]
RESULT = BuildResult(
    buildKey=TARGET.key,
    spec={},
    ok=True,
    manifestDigest=DIGEST,
    imageSize=3 * 1024 * 1024,
    layers=[layer(size, paths, size < 300) for size, paths in SIZES],
    timings={"nixBuild": 1.23456, "total": 2.5},
)


def observed(phase: str, **kwargs: Any) -> observations.PodObservation:
    observation = observations.observe(pod(TARGET.key, phase=phase, **kwargs))
    assert observation is not None
    return observation


def apply(old: dict[str, Any], report: Report, now: datetime = T0) -> dict[str, Any]:
    return conditions.desired_status(old, report, TARGET.generation, TARGET.key, now)


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_ready_reports_references_layers_and_times() -> None:
    done = observed("Succeeded", terminated=terminated(0))
    report = conditions.ready(TARGET, RESULT, done, 1, "reg.example:5000")
    status = apply({}, report)
    assert status["phase"] == "Ready"
    assert status["image"] == "reg.example:5000/default/jq:1.0"
    assert status["imageDigest"] == f"reg.example:5000/default/jq@{DIGEST}"
    assert status["digest"] == DIGEST and status["size"] == 3 * 1024 * 1024
    assert status["layers"]["count"] == 7 and status["layers"]["storePaths"] == 21
    assert status["layers"]["reused"] == 3
    assert [item["size"] for item in status["layers"]["largest"]] == [5000, 900, 800, 700, 200]
    assert status["buildTimes"] == {
        "seconds": {"nixBuild": 1.235, "total": 2.5},
        "startedAt": "2026-01-01T00:00:01Z",
        "finishedAt": "2026-01-01T00:01:00Z",
    }
    assert status["attempts"] == 1
    assert "builderPod" not in status  # the pod handler's field, not the report's
    assert ready_condition(status)["message"] == (
        f"reg.example:5000/default/jq:1.0 is {DIGEST} (7 layers, 3.0 MiB; built by {done.name})"
    )
    assert status["observedGeneration"] == 1 and status["buildKey"] == TARGET.key


def test_a_cached_result_names_no_pod() -> None:
    stale = {"builderPod": "old", "builderPhase": "Succeeded"}
    status = apply(stale, conditions.ready(TARGET, RESULT, None, 0, "r"))
    assert "builderPod" not in status and "builderPhase" not in status
    assert "found in storage" in ready_condition(status)["message"]
    assert "startedAt" not in status["buildTimes"]


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    pending = apply({}, conditions.waiting(observed("Pending"), 1), T0)
    building = apply(pending, conditions.waiting(observed("Running"), 1), T1)
    assert ready_condition(building)["reason"] == "Building"
    assert ready_condition(building)["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    done = apply(building, conditions.ready(TARGET, RESULT, None, 1, "r"), T1)
    assert ready_condition(done)["lastTransitionTime"] == "2026-01-01T00:05:00Z"
    building_condition = next(c for c in done["conditions"] if c["type"] == "Building")
    assert building_condition["status"] == "False"


def test_other_conditions_are_kept() -> None:
    theirs = {
        "type": "Audited",
        "status": "True",
        "reason": "Ok",
        "message": "",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }
    status = apply({"conditions": [theirs]}, conditions.waiting(observed("Pending"), 1))
    assert theirs in status["conditions"]
    assert [c["type"] for c in status["conditions"]] == ["Audited", "Building", "Ready"]


def test_failures_keep_the_last_image_and_list_missing_packages() -> None:
    built = apply({}, conditions.ready(TARGET, RESULT, None, 1, "r"))
    failure = BuildFailure("MissingPackages", "packages not found: nope", False, ("nope",))
    failed = apply(built, conditions.failed(failure, None, 1), T1)
    assert failed["phase"] == "Failed" and failed["missingPackages"] == ["nope"]
    assert failed["digest"] == DIGEST  # the tag still points there
    assert ready_condition(failed)["reason"] == "MissingPackages"
    fixed = apply(failed, conditions.waiting(observed("Pending"), 1))
    assert "missingPackages" not in fixed


def test_invalid_and_queued_and_retrying() -> None:
    invalid = conditions.desired_status({}, conditions.invalid("bad tag"), 3, None, T0)
    assert invalid["phase"] == "Failed" and "buildKey" not in invalid
    assert ready_condition(invalid)["reason"] == "InvalidSpec"
    assert invalid["observedGeneration"] == 3

    queued = apply({}, conditions.queued(4, 4, 1, None))
    assert ready_condition(queued)["message"] == (
        "waiting for a free build slot (4 of 4 builder pods in use)"
    )
    failure = BuildFailure("BuildFailed", "builder pod p was evicted: low memory", True)
    retrying = apply({}, conditions.backing_off(failure, observed("Failed"), 1, 9.6))
    assert retrying["phase"] == "Retrying"
    assert ready_condition(retrying)["reason"] == "BuildFailed"
    assert "attempt 2 starts in 10 s" in ready_condition(retrying)["message"]


def test_the_patch_holds_changes_and_removals_only() -> None:
    old = {"phase": "Failed", "missingPackages": ["x"], "attempts": 1, "builderPhase": "Failed"}
    new = {"phase": "Ready", "attempts": 1, "builderPhase": "Failed"}
    assert conditions.status_patch(old, new) == {"phase": "Ready", "missingPackages": None}
    assert conditions.status_patch(new, new) == {}


def test_one_event_per_ready_transition() -> None:
    pending = apply({}, conditions.waiting(observed("Pending"), 1))
    assert conditions.events({}, pending) == [
        conditions.Event(False, "BuilderPending", ready_condition(pending)["message"])
    ]
    again = apply(pending, conditions.waiting(observed("Pending"), 1), T1)
    assert conditions.events(pending, again) == []
    failure = BuildFailure("EvalError", "Nix evaluation failed: boom", False)
    failed = apply(pending, conditions.failed(failure, None, 1))
    [event] = conditions.events(pending, failed)
    assert event.warning and event.reason == "EvalError" and "boom" in event.message


def test_condition_messages_are_bounded() -> None:
    long = Condition("Ready", "False", "BuildFailed", "x" * 40000)
    [merged] = conditions.merge_conditions([], [long], 1, T0)
    assert len(merged["message"]) == conditions.MAX_MESSAGE
