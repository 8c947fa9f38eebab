"""The builder pod: its name, labels, owner references and manifest. Pure.

Imports specs and settings. One pod per build key and attempt, named from the key: a
second NixImage with the same packages, or the operator after a restart, finds the pod
by name instead of starting another build (kpack does the same to survive informer lag).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from niximage_core import imagespec
from niximage_operator.settings import OperatorSettings
from niximage_operator.specs import Target

GROUP = "niximage.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "NixImage"
PLURAL = "niximages"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "niximage-operator"
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "builder"
POD_LABELS = {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: COMPONENT}
POD_SELECTOR = ",".join(f"{k}={v}" for k, v in POD_LABELS.items())
"""Label selector of builder pods: the operator watches only these."""

KEY_LABEL = f"{GROUP}/build-key"
"""The key's first 63 hex digits (a label value's limit), for ``kubectl get -l``."""
KEY_ANNOTATION = f"{GROUP}/build-key"
"""The whole build key; the operator trusts this, not the name or the label."""
ATTEMPT_LABEL = f"{GROUP}/attempt"

CONTAINER = "builder"
NIX_STORE_VOLUME = "nix-store"
NETRC_VOLUME = "nix-netrc"
NETRC_FILE = "/etc/nix/netrc.d/netrc"
"""Where builder pods see the binary caches' credentials (``netrc_secret``'s key ``netrc``)."""
TERMINATION_LOG = "/dev/termination-log"
NAME_KEY_DIGITS = 20
"""80 bits of the key in the name; a clash is detected through the annotation."""
DEADLINE_MARGIN = 600
"""Seconds a pod may run past the Nix timeout: packing and uploading come after Nix."""


def pod_name(key: str, attempt: int) -> str:
    return f"niximage-build-{key[:NAME_KEY_DIGITS]}-{attempt}"


def owner_reference(owner: Mapping[str, Any], controller: bool) -> dict[str, Any]:
    """A reference to a NixImage. A shared pod has one per NixImage; the first one is the
    controller. blockOwnerDeletion stays off: it would need ``niximages/finalizers``
    permission and would make deleting a NixImage wait for its builder pod."""
    metadata = owner["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": controller,
        "blockOwnerDeletion": False,
    }


def pod_security(user: int) -> dict[str, Any]:
    """Pod Security's "restricted" level: Nix runs single-user as the image's unprivileged
    user, without a sandbox, so a build needs no privilege at all. fsGroup makes a volume
    on the Nix store (or the storage) writable by that user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": user,
        "fsGroup": user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def builder_node_arch(spec: imagespec.BuildTarget, settings: OperatorSettings) -> str:
    """Where the builder runs: an image of one architecture natively, on a node of it; an
    index on a node of ``multi_arch_builder_arch``, whose Nix builds the other platforms
    through emulation (``extra-platforms``, qemu-user's binfmt_misc handler) or substitutes
    them from a binary cache, as Nixery's arm64 builds do."""
    if isinstance(spec, imagespec.IndexSpec):
        return settings.multi_arch_builder_arch
    return spec.arch


def builder_command(target: Target, settings: OperatorSettings) -> list[str]:
    """``niximage build``: the builder computes the same key from the same inputs."""
    spec = target.spec
    return [
        *settings.builder_command,
        "build",
        *spec.packages,
        "--package-source", str(spec.source),
        "--arch", ",".join(target.architectures),
        "--format", spec.format,
        "--compression", spec.compression,
        "--storage", settings.storage,
        "--timeout", f"{settings.build_timeout:g}",
        "--termination-log", TERMINATION_LOG,
        *(arg for url in settings.substituters for arg in ("--substituter", url)),
        *(arg for key in settings.trusted_public_keys for arg in ("--trusted-public-key", key)),
        *(("--netrc-file", NETRC_FILE) if settings.netrc_secret else ()),
    ]  # fmt: skip


def builder_pod(
    target: Target,
    attempt: int,
    owner: Mapping[str, Any],
    settings: OperatorSettings,
) -> dict[str, Any]:
    """The manifest of attempt ``attempt`` at building ``target``'s key."""
    spec = target.spec
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.builder_image,
        "imagePullPolicy": settings.builder_pull_policy,
        "command": builder_command(target, settings),
        "env": [
            {"name": "NIXIMAGE_BUILD_KEY", "value": target.key},
            *({"name": k, "value": v} for k, v in sorted(settings.builder_env.items())),
        ],
        "resources": settings.builder_resources,
        "terminationMessagePath": TERMINATION_LOG,
        # A builder that dies before writing its summary still explains itself: the tail
        # of its log becomes the message (kpack users' complaint about opaque failures, kpack #253).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "nodeSelector": {
            **settings.builder_node_selector,
            "kubernetes.io/arch": builder_node_arch(spec, settings),
            "kubernetes.io/os": "linux",
        },
        "activeDeadlineSeconds": int(settings.build_timeout) + DEADLINE_MARGIN,
        # The builder never talks to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(settings.builder_user),
    }
    if settings.builder_tolerations:
        pod_spec["tolerations"] = list(settings.builder_tolerations)
    if settings.builder_image_pull_secrets:
        pod_spec["imagePullSecrets"] = [
            {"name": name} for name in settings.builder_image_pull_secrets
        ]
    if settings.builder_service_account:
        pod_spec["serviceAccountName"] = settings.builder_service_account
    volumes = list(settings.builder_volumes)
    mounts = list(settings.builder_volume_mounts)
    if settings.nix_store_volume is not None:
        volumes.insert(0, {"name": NIX_STORE_VOLUME, **settings.nix_store_volume})
        mounts.insert(0, {"name": NIX_STORE_VOLUME, "mountPath": settings.nix_store_mount_path})
    if settings.netrc_secret:
        secret = {"secretName": settings.netrc_secret, "defaultMode": 0o440}
        secret["items"] = [{"key": "netrc", "path": NETRC_FILE.rpartition("/")[2]}]
        volumes.append({"name": NETRC_VOLUME, "secret": secret})
        mounts.append(
            {"name": NETRC_VOLUME, "mountPath": NETRC_FILE.rpartition("/")[0], "readOnly": True}
        )
    if volumes:
        pod_spec["volumes"] = volumes
        container["volumeMounts"] = mounts
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(target.key, attempt),
            "namespace": target.namespace,
            "labels": {**POD_LABELS, KEY_LABEL: target.key[:63], ATTEMPT_LABEL: str(attempt)},
            "annotations": {
                KEY_ANNOTATION: target.key,
                f"{GROUP}/packages": " ".join(spec.packages),
                f"{GROUP}/package-source": str(spec.source),
            },
            "ownerReferences": [owner_reference(owner, controller=True)],
        },
        "spec": pod_spec,
    }
