"""The NixImage status: phase, conditions, image references, events. Pure.

Imports specs, observations, and the core's result model, closure diffs and units. Follows the
Kubernetes API conventions (sig-architecture's api-conventions.md, "Typical status properties"):
``Ready`` (positive polarity, for
``kubectl wait``) and ``Building``, each with a CamelCase reason and a message that says
what is wrong; ``lastTransitionTime`` moves only when a condition's status flips;
``observedGeneration`` tells a reader whether the status is about the spec they see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from niximage_core.closurediff import ClosureDiff
from niximage_core.result import BuildResult
from niximage_core.units import format_bytes
from niximage_operator.observations import BuildFailure, PodObservation, format_time
from niximage_operator.specs import Target

READY = "Ready"
BUILDING = "Building"
OUR_CONDITIONS = (READY, BUILDING)
GOOD_REASONS = ("Succeeded", "BuilderPending", "Building", "ResolvingRevision")
"""Reasons that are news, not trouble: their events are Normal, the others Warnings."""
MAX_MESSAGE = 32768
CHANGES_LISTED = 20
LARGEST_LAYERS = 5
NO_POD = {"builderPod": None, "builderPhase": None}
"""``builderPod`` and ``builderPhase`` are written by the pod handler alone, as the pair it
observed, so that every change of pod or phase changes them (and wakes the reconcile
handler). A report only clears them, when no builder pod belongs to the current spec."""


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class Report:
    """The status one reconcile wants, before it is merged into the stored one."""

    phase: str
    """Pending, Building, Retrying, Ready or Failed (a printer column)."""
    ready: Condition
    building: Condition
    fields: dict[str, Any] = field(default_factory=dict)
    """Other status fields to set; None removes a field."""


@dataclass(frozen=True)
class Event:
    warning: bool
    reason: str
    message: str


def _pair(ready: bool, reason: str, message: str, building: bool) -> tuple[Condition, Condition]:
    return (
        Condition(READY, "True" if ready else "False", reason, message),
        Condition(BUILDING, "True" if building else "False", reason, message),
    )


def invalid(message: str, reason: str = "InvalidSpec") -> Report:
    """A spec the operator refuses (``InvalidSpec``), or whose package source its policy
    does not allow (``SourceNotAllowed``): no pod, until the spec changes."""
    ready, building = _pair(False, reason, message, building=False)
    fields = {"missingPackages": None, "buildKey": None, **NO_POD}
    return Report("Failed", ready, building, fields)


def resolving(message: str, unresolved: bool) -> Report:
    """A followed NixImage whose reference has no revision yet (``spec.follow``): nothing
    to build until the follow loop resolves it, or says why it cannot."""
    reason = "RevisionUnresolved" if unresolved else "ResolvingRevision"
    ready_condition, building = _pair(False, reason, message, building=False)
    return Report("Pending", ready_condition, building, {"missingPackages": None, **NO_POD})


def closure_change(summary: ClosureDiff, old: str, new: str) -> dict[str, Any]:
    """``status.lastChange``: what a rebuild changed, short enough for a status (the full
    list is ``niximage diff``'s)."""
    return {
        "from": old,
        "to": new,
        "summary": summary.summary(),
        "changed": [
            {"name": c.new.name, "oldVersion": c.old.version, "newVersion": c.new.version}
            for c in summary.changed[:CHANGES_LISTED]
        ],
        "added": [{"name": p.name, "version": p.version} for p in summary.added[:CHANGES_LISTED]],
        "removed": [
            {"name": p.name, "version": p.version} for p in summary.removed[:CHANGES_LISTED]
        ],
        "bytesAdded": summary.bytes_added,
        "bytesRemoved": summary.bytes_removed,
        "layersReused": summary.layers.reused if summary.layers else 0,
        "layersNew": summary.layers.new if summary.layers else 0,
        "bytesToPull": summary.layers.new_bytes if summary.layers else 0,
    }


def storage_unavailable(message: str) -> Report:
    ready, building = _pair(False, "StorageError", message, building=False)
    return Report("Retrying", ready, building)


def builder_rejected(message: str) -> Report:
    """The API server refused the builder pod (quota, Pod Security admission, a missing
    service account): nothing runs until someone changes the cluster, so it is said."""
    ready_condition, building = _pair(False, "BuilderRejected", message, building=False)
    return Report("Retrying", ready_condition, building, dict(NO_POD))


def ready(
    target: Target,
    result: BuildResult,
    pod: PodObservation | None,
    attempts: int,
    registry: str,
) -> Report:
    digest = result.manifestDigest or ""
    image = f"{registry}/{target.repository}:{target.tag}"
    how = "found in storage" if pod is None else f"built by {pod.name}"
    size = format_bytes(result.imageSize, binary=True)
    what = f"{len(result.layers)} layers, {size}"
    if result.platforms:
        what = f"an index of {', '.join(p.architecture for p in result.platforms)}; {what}"
    if result.derivationsBuilt:
        how += f", {result.derivationsBuilt} derivations built from source"
    message = f"{image} is {digest} ({what}; {how})"
    ready_condition, building = _pair(True, "Succeeded", message, building=False)
    fields: dict[str, Any] = {
        "image": image,
        "imageDigest": f"{registry}/{target.repository}@{digest}",
        "digest": digest,
        # Each platform's own image of an index (None clears an earlier index's list).
        "platforms": [
            {
                "architecture": platform.architecture,
                "digest": platform.manifestDigest,
                "imageDigest": f"{registry}/{target.repository}@{platform.manifestDigest}",
            }
            for platform in result.platforms
        ]
        or None,
        "size": result.imageSize,
        "layers": layer_summary(result),
        "nix": {
            "derivationsBuilt": result.derivationsBuilt,
            "narsDownloaded": result.narsDownloaded,
            "narBytesDownloaded": result.narBytesDownloaded,
            "bytesDownloaded": result.bytesDownloaded,
        },
        "buildTimes": build_times(result, pod),
        "missingPackages": None,
        "attempts": attempts,
        **(NO_POD if pod is None else {}),
    }
    return Report("Ready", ready_condition, building, fields)


def waiting(pod: PodObservation, attempts: int) -> Report:
    """A pod exists and has not finished."""
    if pod.started:
        message = f"builder pod {pod.name} is building (attempt {pod.attempt})"
        ready_condition, building = _pair(False, "Building", message, building=True)
        phase = "Building"
    else:
        message = f"builder pod {pod.name} is pending (attempt {pod.attempt})"
        if pod.container_reason:
            message += f": {pod.container_reason}"
            message += f": {pod.pod_message}" if pod.pod_message else ""
        ready_condition, building = _pair(False, "BuilderPending", message, building=True)
        phase = "Pending"
    return Report(phase, ready_condition, building, {"attempts": attempts, "missingPackages": None})


def queued(in_use: int, limit: int, attempt: int, after: BuildFailure | None) -> Report:
    message = f"waiting for a free build slot ({in_use} of {limit} builder pods in use)"
    if after is not None:
        message = f"{after.message}; attempt {attempt} is {message}"
    ready_condition, building = _pair(False, "BuilderPending", message, building=True)
    return Report("Pending", ready_condition, building, {"missingPackages": None, **NO_POD})


def backing_off(failure: BuildFailure, pod: PodObservation, attempts: int, delay: float) -> Report:
    message = f"{failure.message}; attempt {attempts + 1} starts in {delay:.0f} s"
    ready_condition = Condition(READY, "False", failure.reason, message)
    building = Condition(BUILDING, "True", "BuilderPending", message)
    return Report(
        "Retrying", ready_condition, building, {"attempts": attempts, "missingPackages": None}
    )


def failed(failure: BuildFailure, pod: PodObservation | None, attempts: int) -> Report:
    ready_condition, building = _pair(False, failure.reason, failure.message, building=False)
    fields: dict[str, Any] = {
        "missingPackages": list(failure.missing) or None,
        "attempts": attempts,
        **(NO_POD if pod is None else {}),
    }
    return Report("Failed", ready_condition, building, fields)


def layer_summary(result: BuildResult) -> dict[str, Any]:
    largest = sorted(result.layers, key=lambda layer: -layer.size)[:LARGEST_LAYERS]
    return {
        "count": len(result.layers),
        "storePaths": sum(len(layer.paths) for layer in result.layers),
        "reused": sum(1 for layer in result.layers if layer.reused),
        "largest": [
            {"digest": layer.digest, "size": layer.size, "storePaths": len(layer.paths)}
            for layer in largest
        ],
    }


def build_times(result: BuildResult, pod: PodObservation | None) -> dict[str, Any]:
    """Phase timings of the build that made the image, and the pod's clock if one ran."""
    times: dict[str, Any] = {
        "seconds": {phase: round(value, 3) for phase, value in sorted(result.timings.items())},
    }
    if pod is not None and pod.started_at is not None:
        times["startedAt"] = format_time(pod.started_at)
    if pod is not None and pod.finished_at is not None:
        times["finishedAt"] = format_time(pod.finished_at)
    return times


def merge_conditions(
    old: Iterable[Any], new: Iterable[Condition], generation: int, now: datetime
) -> list[dict[str, Any]]:
    """Our conditions replaced, others kept; a time moves only when the status flips."""
    previous = {c.get("type"): c for c in old if isinstance(c, Mapping)}
    merged = [dict(c) for t, c in previous.items() if t not in OUR_CONDITIONS]
    for condition in new:
        before = previous.get(condition.type) or {}
        flipped = before.get("status") != condition.status or not before.get("lastTransitionTime")
        merged.append(
            {
                "type": condition.type,
                "status": condition.status,
                "reason": condition.reason,
                "message": condition.message[:MAX_MESSAGE],
                "observedGeneration": generation,
                "lastTransitionTime": format_time(now) if flipped else before["lastTransitionTime"],
            }
        )
    return sorted(merged, key=lambda c: str(c.get("type")))


def desired_status(
    old: Mapping[str, Any], report: Report, generation: int, key: str | None, now: datetime
) -> dict[str, Any]:
    """The complete status after this report (fields the report leaves alone kept)."""
    status = {k: v for k, v in old.items()}
    status.update(
        {
            "phase": report.phase,
            "observedGeneration": generation,
            "buildKey": key,
            "conditions": merge_conditions(
                old.get("conditions") or (), (report.ready, report.building), generation, now
            ),
        }
    )
    status.update(report.fields)
    return {k: v for k, v in status.items() if v is not None}


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch from ``old`` to ``new``: changed keys, and None for removed ones."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """One event when the Ready condition changes status or reason."""
    before = _condition(old, READY) or {}
    after = _condition(new, READY)
    if after is None or _summary(before) == _summary(after):
        return []
    reason = str(after.get("reason"))
    return [Event(reason not in GOOD_REASONS, reason, str(after.get("message")))]


def _summary(condition: Mapping[str, Any]) -> tuple[Any, Any]:
    return condition.get("status"), condition.get("reason")


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in status.get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return condition
    return None
