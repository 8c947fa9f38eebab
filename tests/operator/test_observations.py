"""observations: what a builder pod says about its build, as a condition reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from operator_samples import pod, target, terminated

from niximage_core.errors import NixFailure, PackagesNotFound, StorageError
from niximage_core.result import BuildError, BuildResult
from niximage_operator import observations
from niximage_operator.observations import BuildFailure

KEY = target().key


def failed_with(message: str, exit_code: int = 1, **status: object) -> BuildFailure | None:
    failed = pod(KEY, phase="Failed", terminated=terminated(exit_code, message), **status)
    observation = observations.observe(failed)
    assert observation is not None
    return observations.failure(observation, KEY)


def builder_message(error: Exception) -> str:
    """The real builder's termination message for ``error``."""
    result = BuildResult(
        buildKey=KEY,
        spec={},
        ok=False,
        error=BuildError.from_exception(error),  # type: ignore[arg-type]
    )
    return result.termination_message()


def test_observe_reads_phase_times_owners_and_message() -> None:
    message = json.dumps({"buildKey": KEY, "ok": True, "digest": "sha256:" + "a" * 64})
    observation = observations.observe(
        pod(KEY, attempt=3, phase="Succeeded", terminated=terminated(0, message))
    )
    assert observation is not None
    assert (observation.key, observation.attempt, observation.phase) == (KEY, 3, "Succeeded")
    assert observation.terminal and not observation.active and observation.started
    assert observation.finished_at == datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    assert observations.summary(observation) == json.loads(message)
    assert observations.failure(observation, KEY) is None


def test_a_pod_without_our_annotation_is_not_a_builder() -> None:
    foreign = pod(KEY)
    del foreign["metadata"]["annotations"]
    assert observations.observe(foreign) is None


def test_pending_and_running_are_no_failure() -> None:
    for phase in ("Pending", "Running"):
        observation = observations.observe(pod(KEY, phase=phase))
        assert observation is not None and observation.active
        assert observations.failure(observation, KEY) is None


def test_missing_packages_are_permanent_and_listed() -> None:
    found = failed_with(builder_message(PackagesNotFound(["nope", "python3.nope"])), 2)
    assert found == BuildFailure(
        "MissingPackages",
        "packages not found: nope, python3.nope",
        transient=False,
        missing=("nope", "python3.nope"),
    )


def test_a_builder_storage_error_is_transient() -> None:
    found = failed_with(builder_message(StorageError("bucket gone")))
    assert found is not None and found.reason == "StorageError" and found.transient


def test_a_network_failure_of_nix_is_transient() -> None:
    """The builder's own verdict travels in the termination message (``transient``)."""
    error = NixFailure("EvalError", "Nix evaluation failed: unable to download …", transient=True)
    found = failed_with(builder_message(error))
    assert found is not None and found.reason == "EvalError" and found.transient


@pytest.mark.parametrize(
    ("kind", "reason", "transient"),
    [
        ("EvalError", "EvalError", False),
        ("BuildFailed", "BuildFailed", False),
        ("Timeout", "Timeout", True),
        ("InvalidSpec", "InvalidSpec", False),
        ("NixMissing", "BuildFailed", False),
    ],
)
def test_builder_error_kinds(kind: str, reason: str, transient: bool) -> None:
    message = json.dumps({"buildKey": KEY, "ok": False, "kind": kind, "message": "details"})
    found = failed_with(message)
    assert found is not None and (found.reason, found.transient) == (reason, transient)
    assert "details" in found.message and (kind in found.message or kind == reason)


def test_pod_level_failures_are_transient_and_explained() -> None:
    evicted = observations.observe(
        pod(KEY, phase="Failed", reason="Evicted", message="The node was low on memory.")
    )
    assert evicted is not None
    found = observations.failure(evicted, KEY)
    assert found is not None and found.transient and "evicted: The node was low" in found.message

    late = pod(KEY, phase="Failed", reason="DeadlineExceeded", message="Pod was active too long")
    deadline = observations.observe(late)
    assert deadline is not None
    assert observations.failure(deadline, KEY) == BuildFailure(
        "Timeout", f"builder pod {deadline.name} ran out of time: Pod was active too long", True
    )

    oom = failed_with(
        "",
        137,
    )
    assert oom is not None and oom.transient
    killed = observations.observe(
        pod(KEY, phase="Failed", terminated=terminated(137, "", reason="OOMKilled"))
    )
    assert killed is not None
    assert "OOMKilled" in observations.failure(killed, KEY).message  # type: ignore[union-attr]


def test_a_log_tail_from_a_crash_is_kept() -> None:
    found = failed_with("Traceback (most recent call last):\n  ...\nMemoryError", 1)
    assert found is not None and found.transient and found.reason == "BuildFailed"
    assert "MemoryError" in found.message and "exit code 1" in found.message


def test_exit_2_without_a_summary_is_invalid_input() -> None:
    found = failed_with("niximage: invalid package name 'x$'", 2)
    assert found is not None and found.reason == "InvalidSpec" and not found.transient
    assert "invalid package name" in found.message


def test_a_different_build_key_is_a_final_mismatch() -> None:
    message = json.dumps({"buildKey": "f" * 64, "ok": True, "digest": "sha256:" + "a" * 64})
    succeeded = pod(KEY, phase="Succeeded", terminated=terminated(0, message))
    observation = observations.observe(succeeded)
    assert observation is not None
    found = observations.failure(observation, KEY)
    assert found is not None and not found.transient and "expected" in found.message


def test_a_deleted_pod_that_had_not_finished_is_a_transient_failure() -> None:
    observation = observations.observe(pod(KEY, phase="Running"), deleted=True)
    assert observation is not None and observation.phase == "Deleted" and not observation.active
    found = observations.failure(observation, KEY)
    assert found is not None and found.transient and "deleted" in found.message


def test_times_are_rfc3339_utc() -> None:
    moment = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert observations.format_time(moment) == "2026-03-04T05:06:07Z"
    assert observations.parse_time("2026-03-04T05:06:07Z") == moment
    assert observations.parse_time("yesterday") is None
