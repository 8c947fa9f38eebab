"""Pull Secrets (niximage_operator.pullsecrets): what is written, and when a token is renewed.

The API calls go to a recording stand-in of ``Kube``; the real API server's side (RBAC, the
TokenRequest API, the registry checking the token) is tests/cluster/test_pull_auth.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from niximage_operator import pullsecrets
from niximage_operator.kube import KubeError

START = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86400


class RecordingKube:
    """Objects by URL, and every call made; tokens count up so a renewal is visible."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.issued = 0
        self.now = START
        self.fail_tokens = False

    async def get(self, version: str, url: str) -> dict[str, Any] | None:
        self.calls.append(("get", url))
        return self.objects.get(url)

    async def create_if_absent(self, version: str, url: str, manifest: Mapping[str, Any]) -> None:
        self.calls.append(("create", url))
        self.objects.setdefault(f"{url}/{manifest['metadata']['name']}", dict(manifest))

    async def put(
        self,
        version: str,
        url: str,
        name: str,
        manifest: Mapping[str, Any],
        stored: Mapping[str, Any] | None,
    ) -> None:
        self.calls.append(("put", f"{url}/{name}"))
        self.objects[f"{url}/{name}"] = dict(manifest)

    async def request_token(self, namespace: str, account: str, seconds: int) -> tuple[str, Any]:
        self.calls.append(("token", f"{namespace}/{account}"))
        if self.fail_tokens:
            raise KubeError(403, "serviceaccounts/token is forbidden")
        self.issued += 1
        return f"token-{self.issued}", self.now + timedelta(seconds=seconds)


def keeper(kube: RecordingKube) -> pullsecrets.PullSecrets:
    return pullsecrets.PullSecrets(
        kube,  # type: ignore[arg-type]
        "registry.test:5000",
        "niximage-puller",
        DAY,
        clock=lambda: kube.now,
    )


def docker_config(secret: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    return config


SECRET_URL = "namespaces/team/secrets/niximage-pull"


def test_the_secret_is_what_kubelet_reads_for_the_registry() -> None:
    secret = pullsecrets.pull_secret("team", "registry.test:5000", "tok", START)
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    (host,) = docker_config(secret)["auths"]
    entry = docker_config(secret)["auths"][host]
    assert host == "registry.test:5000"
    assert entry["password"] == "tok"
    assert base64.b64decode(entry["auth"]).decode() == f"{entry['username']}:tok"
    assert secret["metadata"]["annotations"][pullsecrets.EXPIRES] == "2026-01-01T00:00:00Z"


def test_the_puller_is_bound_in_its_namespace_only_and_mounts_no_token() -> None:
    account = pullsecrets.service_account("team")
    assert account["automountServiceAccountToken"] is False
    binding = pullsecrets.role_binding("team", "niximage-puller")
    assert binding["metadata"]["namespace"] == "team"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "niximage-puller",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "niximage-puller", "namespace": "team"}
    ]


@pytest.mark.parametrize(
    ("secret", "due"),
    [
        (None, None),
        ({"metadata": {}}, None),
        ({"metadata": {"annotations": {pullsecrets.EXPIRES: "soon"}}}, None),
        (
            {"metadata": {"annotations": {pullsecrets.EXPIRES: "2026-01-03T00:00:00Z"}}},
            datetime(2026, 1, 2, 12, tzinfo=UTC),
        ),
    ],
)
def test_renewal_is_due_half_a_lifetime_before_expiry(
    secret: dict[str, Any] | None, due: datetime | None
) -> None:
    assert pullsecrets.refresh_at(secret, timedelta(days=1)) == due


def test_the_first_reconcile_writes_everything_and_later_ones_call_nothing() -> None:
    kube = RecordingKube()
    secrets = keeper(kube)
    assert asyncio.run(secrets.ensure("team")) == pullsecrets.SECRET
    assert [call for call, _ in kube.calls] == ["get", "create", "create", "token", "put"]
    assert (
        docker_config(kube.objects[SECRET_URL])["auths"]["registry.test:5000"]["password"]
        == "token-1"
    )
    kube.calls.clear()
    kube.now += timedelta(hours=11)
    asyncio.run(secrets.ensure("team"))
    assert kube.calls == []  # the hot path: not due, no API call


def test_a_token_past_half_its_lifetime_is_replaced() -> None:
    kube = RecordingKube()
    secrets = keeper(kube)
    asyncio.run(secrets.ensure("team"))
    kube.now += timedelta(hours=12, seconds=1)
    asyncio.run(secrets.refresh())
    password = docker_config(kube.objects[SECRET_URL])["auths"]["registry.test:5000"]["password"]
    assert password == "token-2"


def test_after_a_restart_a_good_secret_is_kept() -> None:
    kube = RecordingKube()
    asyncio.run(keeper(kube).ensure("team"))
    kube.calls.clear()
    kube.now += timedelta(hours=1)
    asyncio.run(keeper(kube).ensure("team"))  # a new operator process: nothing remembered
    assert kube.calls == [("get", SECRET_URL)]
    assert kube.issued == 1


def test_a_refused_token_request_is_an_error_and_is_tried_again() -> None:
    kube = RecordingKube()
    kube.fail_tokens = True
    secrets = keeper(kube)
    with pytest.raises(KubeError, match="forbidden"):
        asyncio.run(secrets.ensure("team"))
    assert SECRET_URL not in kube.objects
    kube.fail_tokens = False
    asyncio.run(secrets.ensure("team"))
    assert SECRET_URL in kube.objects
