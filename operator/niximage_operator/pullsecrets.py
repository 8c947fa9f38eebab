"""Pull Secrets: a pod pulls its namespace's NixImages with ``imagePullSecrets`` and nothing else.

In every namespace that has NixImages the operator keeps three objects:

- ServiceAccount ``niximage-puller`` (no token mounted anywhere: nothing runs as it);
- RoleBinding ``niximage-puller`` of it to the chart's ClusterRole that grants ``get`` on
  NixImages (``puller_cluster_role``), so, in this namespace only, it may do what the
  registry's SubjectAccessReview asks;
- Secret ``niximage-pull`` (``kubernetes.io/dockerconfigjson``) with a TokenRequest token
  of that service account as the password for the registry host.

The registry checks that token with TokenReview and SubjectAccessReview
(``niximage_registry.kubeauth``), so a namespace's Secret never pulls another namespace's
images. Tokens are bound (they expire, and die with the service account); the Secret
records its token's expiry in an annotation, and is rewritten once half of the lifetime
has passed: by the next reconcile of a NixImage there, or by ``refresh``, which the
operator runs with its periodic sweep. The objects stay when the last NixImage goes
(deleting a Secret a pod still names would break its next pull); removing the namespace
removes them.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from niximage_operator.kube import Kube

SERVICE_ACCOUNT = "niximage-puller"
ROLE_BINDING = "niximage-puller"
SECRET = "niximage-pull"
EXPIRES = "niximage.dev/token-expires"
USERNAME = "serviceaccount"
"""Any user name will do (the registry reads the token only); OpenShift's convention."""
LABELS = {"app.kubernetes.io/managed-by": "niximage-operator"}


def service_account(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": SERVICE_ACCOUNT, "namespace": namespace, "labels": LABELS},
        "automountServiceAccountToken": False,
    }


def role_binding(namespace: str, cluster_role: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": ROLE_BINDING, "namespace": namespace, "labels": LABELS},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": cluster_role,
        },
        "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
    }


def pull_secret(namespace: str, registry: str, token: str, expires: datetime) -> dict[str, Any]:
    """The ``kubernetes.io/dockerconfigjson`` Secret kubelet reads for ``registry``."""
    auth = base64.b64encode(f"{USERNAME}:{token}".encode()).decode()
    config = {"auths": {registry: {"username": USERNAME, "password": token, "auth": auth}}}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": {
            "name": SECRET,
            "namespace": namespace,
            "labels": LABELS,
            "annotations": {EXPIRES: _timestamp(expires)},
        },
        "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    }


def refresh_at(secret: dict[str, Any] | None, lifetime: timedelta) -> datetime | None:
    """When a stored Secret's token is due for renewal (half its lifetime before it
    expires); None when it must be written now (absent, or not ours, or unreadable)."""
    if secret is None:
        return None
    expires = ((secret.get("metadata") or {}).get("annotations") or {}).get(EXPIRES)
    try:
        return datetime.fromisoformat(str(expires).replace("Z", "+00:00")) - lifetime / 2
    except ValueError:
        return None


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PullSecrets:
    """Keeps each namespace's puller objects and token fresh; remembers when each is due."""

    def __init__(
        self,
        kube: Kube,
        registry: str,
        cluster_role: str,
        token_seconds: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._kube, self._registry, self._cluster_role = kube, registry, cluster_role
        self._seconds = token_seconds
        self._clock = clock
        self._due: dict[str, datetime] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, namespace: str) -> str:
        """The Secret's name, after making sure it holds a token that is not due."""
        due = self._due.get(namespace)
        if due is not None and self._clock() < due:
            return SECRET  # the hot path: no API call
        async with self._locks.setdefault(namespace, asyncio.Lock()):
            due = self._due.get(namespace)
            if due is None or self._clock() >= due:
                self._due[namespace] = await self._renew(namespace)
        return SECRET

    async def refresh(self) -> None:
        """Renew every known namespace's token that is due (the periodic sweep calls it)."""
        for namespace in list(self._due):
            await self.ensure(namespace)

    async def _renew(self, namespace: str) -> datetime:
        lifetime = timedelta(seconds=self._seconds)
        stored = await self._kube.get("v1", f"namespaces/{namespace}/secrets/{SECRET}")
        due = refresh_at(stored, lifetime)
        if due is not None and self._clock() < due:
            return due  # a restart: the Secret written before is still good
        await self._kube.create_if_absent(
            "v1", f"namespaces/{namespace}/serviceaccounts", service_account(namespace)
        )
        await self._kube.create_if_absent(
            "rbac.authorization.k8s.io/v1",
            f"namespaces/{namespace}/rolebindings",
            role_binding(namespace, self._cluster_role),
        )
        token, expires = await self._kube.request_token(namespace, SERVICE_ACCOUNT, self._seconds)
        secret = pull_secret(namespace, self._registry, token, expires)
        await self._kube.put("v1", f"namespaces/{namespace}/secrets", SECRET, secret, stored)
        return expires - (expires - self._clock()) / 2
