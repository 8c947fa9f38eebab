"""Sample NixImages, pods and settings for the operator's pure tests (no I/O)."""

from __future__ import annotations

import copy
from typing import Any

from niximage_operator import podspec, specs
from niximage_operator.settings import OperatorSettings

NAR_HASH = "sha256-" + "A" * 43 + "="
OTHER_HASH = "sha256-" + "B" * 43 + "="
PKGS = "/opt/niximage/pkgs"
SOURCE = f"path:{PKGS}#{NAR_HASH}"
UID = "6f1c2a52-6c1f-4c55-9b4e-2f0d0f1d2a10"


def settings(**overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "storage": "gs://niximage-test",
        "registry": "registry.example:5000",
        "builder_image": "ghcr.io/example/niximage:1",
        "default_package_source": SOURCE,
        **overrides,
    }
    return OperatorSettings(**values)


def sources(*extra: str) -> specs.PackageSources:
    """The sample sources, allowing any nixpkgs or git source (test_sourcepolicy has the
    allow-list)."""
    return specs.PackageSources.configure(SOURCE, extra, allowed=["nixpkgs:*", "git:*"])


def body(
    name: str = "jq",
    packages: tuple[str, ...] = ("jq", "bash"),
    namespace: str = "default",
    generation: int = 1,
    uid: str = UID,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "niximage.dev/v1alpha1",
        "kind": "NixImage",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation},
        "spec": {"packages": list(packages), **spec},
    }
    if status is not None:
        obj["status"] = copy.deepcopy(status)
    return obj


def target(**kwargs: Any) -> specs.Target:
    return specs.resolve(body(**kwargs), sources())


def pod(
    key: str,
    attempt: int = 1,
    phase: str = "Pending",
    terminated: dict[str, Any] | None = None,
    namespace: str = "default",
    owners: tuple[str, ...] = (UID,),
    **status: Any,
) -> dict[str, Any]:
    """A builder pod as the API server would return it after the kubelet's updates."""
    container: dict[str, Any] = {"name": podspec.CONTAINER, "state": {}}
    if terminated is not None:
        container["state"] = {"terminated": terminated}
    elif phase == "Running":
        container["state"] = {"running": {"startedAt": "2026-01-01T00:00:01Z"}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": podspec.pod_name(key, attempt),
            "namespace": namespace,
            "uid": f"pod-{key[:6]}-{attempt}",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {**podspec.POD_LABELS, podspec.ATTEMPT_LABEL: str(attempt)},
            "annotations": {podspec.KEY_ANNOTATION: key},
            "ownerReferences": [{"uid": uid, "name": "x"} for uid in owners],
        },
        "status": {"phase": phase, "containerStatuses": [container], **status},
    }


def terminated(exit_code: int, message: str = "", reason: str = "") -> dict[str, Any]:
    return {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "message": message,
        "startedAt": "2026-01-01T00:00:01Z",
        "finishedAt": "2026-01-01T00:01:00Z",
    }
