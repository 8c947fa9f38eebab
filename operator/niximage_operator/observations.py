"""What a builder pod says about its build: phase, times, and the builder's summary. Pure.

Imports podspec only. The builder writes a short JSON summary (``BuildResult.
termination_message``) to /dev/termination-log; the kubelet puts it in the pod status, so
the operator needs neither ``pods/log`` nor storage to learn how a build ended. When the
builder died before writing it, the pod's own reasons (Evicted, OOMKilled,
DeadlineExceeded, the log tail) say why, and such failures are worth retrying.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from niximage_operator import podspec

TERMINAL = ("Succeeded", "Failed")
REASONS = ("MissingPackages", "InvalidSpec", "EvalError", "BuildFailed", "Timeout", "StorageError")
"""Builder error kinds that are condition reasons as they are."""
TRANSIENT_KINDS = ("Timeout", "StorageError")
"""Builder error kinds worth another attempt (the builder's ``transient`` errors)."""
EXIT_INVALID_INPUT = 2
"""``niximage`` exits 2 when the user must change something."""


@dataclass(frozen=True)
class PodObservation:
    """One builder pod as last seen."""

    namespace: str
    name: str
    uid: str
    key: str
    attempt: int
    phase: str
    """Pending, Running, Succeeded, Failed or Unknown; "Deleted" once it is gone."""
    owners: tuple[str, ...] = ()
    """UIDs of the NixImages that own it."""
    deleting: bool = False
    exit_code: int | None = None
    message: str = ""
    """The termination message (the builder's JSON summary, or the log tail)."""
    container_reason: str = ""
    """Why the container stopped or waits: Completed, Error, OOMKilled, ErrImagePull …"""
    pod_reason: str = ""
    """Why the pod failed as a whole: Evicted, DeadlineExceeded …"""
    pod_message: str = ""
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def active(self) -> bool:
        """Occupies a build slot: neither finished nor gone."""
        return not self.terminal and self.phase != "Deleted"

    @property
    def started(self) -> bool:
        return self.phase == "Running" or self.terminal


@dataclass(frozen=True)
class BuildFailure:
    """Why a build did not produce an image, as a condition reason and message."""

    reason: str
    message: str
    transient: bool
    missing: tuple[str, ...] = ()


def observe(pod: Mapping[str, Any], deleted: bool = False) -> PodObservation | None:
    """Read a builder pod; None for a pod without our build-key annotation."""
    metadata = pod.get("metadata") or {}
    key = (metadata.get("annotations") or {}).get(podspec.KEY_ANNOTATION)
    if not key:
        return None
    status = pod.get("status") or {}
    container = _builder_container(status)
    state = container.get("state") or {}
    terminated = state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    try:
        attempt = int((metadata.get("labels") or {}).get(podspec.ATTEMPT_LABEL, "1"))
    except ValueError:
        attempt = 1
    return PodObservation(
        namespace=metadata.get("namespace") or "",
        name=metadata.get("name") or "",
        uid=metadata.get("uid") or "",
        key=key,
        attempt=attempt,
        phase="Deleted" if deleted else status.get("phase") or "Pending",
        owners=tuple(ref.get("uid", "") for ref in metadata.get("ownerReferences") or ()),
        deleting=bool(metadata.get("deletionTimestamp")),
        exit_code=terminated.get("exitCode"),
        message=terminated.get("message") or "",
        container_reason=terminated.get("reason") or waiting.get("reason") or "",
        pod_reason=status.get("reason") or "",
        pod_message=status.get("message") or waiting.get("message") or "",
        created_at=parse_time(metadata.get("creationTimestamp")),
        started_at=parse_time(terminated.get("startedAt") or status.get("startTime")),
        finished_at=parse_time(terminated.get("finishedAt")) or _condition_time(status),
    )


def summary(observation: PodObservation) -> dict[str, Any] | None:
    """The builder's JSON summary, if the termination message is one."""
    try:
        value = json.loads(observation.message)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "ok" in value else None


def failure(observation: PodObservation, expected_key: str) -> BuildFailure | None:
    """Why this pod's build failed; None while it runs or when it produced an image."""
    data = summary(observation)
    if data is not None and data.get("buildKey") not in (None, expected_key):
        # Operator and builder disagree on the key: different builder version or package
        # set. Building again gives the same answer, so this is final.
        return BuildFailure(
            "BuildFailed",
            f"builder pod {observation.name} computed build key {data.get('buildKey')}, "
            f"the operator expected {expected_key}: do the operator and builder images "
            "(and their package sets) match?",
            transient=False,
        )
    if observation.phase == "Succeeded":
        return None
    if observation.phase == "Deleted" or (observation.deleting and not observation.terminal):
        return BuildFailure(
            "BuildFailed",
            f"builder pod {observation.name} was deleted before it finished",
            transient=True,
        )
    if observation.phase != "Failed":
        return None
    if data is not None and not data.get("ok"):
        return _builder_error(data)
    return _pod_failure(observation)


def _builder_error(data: Mapping[str, Any]) -> BuildFailure:
    kind = str(data.get("kind") or "BuildFailed")
    message = str(data.get("message") or kind)
    missing = tuple(str(name) for name in data.get("missingPackages") or ())
    if kind not in REASONS:
        message = f"{kind}: {message}"
    return BuildFailure(
        kind if kind in REASONS else "BuildFailed",
        message,
        # The builder says when a failure is worth another attempt (Nix could not reach
        # the network); older builders did not, and their kinds tell.
        transient=bool(data.get("transient")) or kind in TRANSIENT_KINDS,
        missing=missing,
    )


def _pod_failure(observation: PodObservation) -> BuildFailure:
    name = observation.name
    detail = (observation.pod_message or observation.message).strip()
    if observation.pod_reason == "Evicted":
        return BuildFailure("BuildFailed", f"builder pod {name} was evicted: {detail}", True)
    if observation.pod_reason == "DeadlineExceeded":
        return BuildFailure("Timeout", f"builder pod {name} ran out of time: {detail}", True)
    if observation.container_reason == "OOMKilled":
        return BuildFailure(
            "BuildFailed",
            f"builder pod {name} ran out of memory (OOMKilled); raise the builder's memory limit",
            transient=True,
        )
    log = _tail(observation.message)
    if observation.exit_code == EXIT_INVALID_INPUT:
        return BuildFailure("InvalidSpec", f"the builder rejected the spec: {log}", False)
    reason = observation.container_reason or observation.pod_reason or "unknown reason"
    return BuildFailure(
        "BuildFailed",
        f"builder pod {name} failed (exit code {observation.exit_code}, {reason}): {log}",
        transient=True,
    )


def _tail(text: str, limit: int = 1000) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-5:]) or "no output"
    return tail if len(tail) <= limit else "…" + tail[-limit:]


def _builder_container(status: Mapping[str, Any]) -> Mapping[str, Any]:
    for container in status.get("containerStatuses") or ():
        if container.get("name") == podspec.CONTAINER:
            return dict(container)
    return {}


def _condition_time(status: Mapping[str, Any]) -> datetime | None:
    """When a pod failed without a container state (eviction): its Ready condition's time."""
    if status.get("phase") not in TERMINAL:
        return None
    for condition in status.get("conditions") or ():
        if condition.get("type") == "Ready":
            return parse_time(condition.get("lastTransitionTime"))
    return None


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a Z, as the API server writes it."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
