"""A long-lived operator keeps working when its projected token is replaced (the real API
server): the kubelet swaps the token file before the token expires, and pykube-ng on its
own would keep sending the first token. Here the first token's service account is deleted
and made again, which invalidates that token at once, as expiry would an hour later."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pykube
import pytest
import yaml

from kubesupport.cluster import Cluster, eventually
from kubesupport.controlplane import kubeconfig
from niximage_operator.kube import Kube, KubeError

ACCOUNT = "rotating"


def account_token(kube: Cluster, namespace: str) -> str:
    kube.admin.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": ACCOUNT, "namespace": namespace}}
    )  # fmt: skip
    return kube.admin.run(
        "create", "token", ACCOUNT, "-n", namespace, "--duration=1h"
    ).stdout.strip()  # fmt: skip


def test_a_replaced_token_file_is_followed(kube: Cluster, tenant: str, tmp_path: Path) -> None:
    kube.admin.apply(
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "read-pods", "namespace": tenant},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "read-pods", "namespace": tenant},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "read-pods"},
         "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": tenant}]},
    )  # fmt: skip
    first = account_token(kube, tenant)
    token_file = tmp_path / "token"
    token_file.write_text(first)
    ca = kube.plane.pki / "ca.crt"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig(kube.plane.url, ca, {"tokenFile": str(token_file)})))
    pinned = tmp_path / "pinned"
    pinned.write_text(yaml.safe_dump(kubeconfig(kube.plane.url, ca, {"token": first})))

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBECONFIG", str(path))
        client = Kube.from_environment()
    assert asyncio.run(client.get_pod(tenant, "no-such-pod")) is None  # authorised: a 404

    # The first token stops working (its account is another one now); the kubelet writes
    # the next token into the file.
    kube.admin.run("delete", "serviceaccount", ACCOUNT, "-n", tenant)
    token_file.write_text(account_token(kube, tenant))
    # What pykube alone does with the first token: refused, once the API server's cache of
    # successful authentications (10 s) has let go of it.
    stale = Kube(pykube.HTTPClient(pykube.KubeConfig.from_file(str(pinned))))

    def refused() -> int | None:
        try:
            asyncio.run(stale.get_pod(tenant, "no-such-pod"))
        except KubeError as exc:
            return exc.status
        return None

    assert eventually(refused, 60, "the first token is refused") == 401
    assert asyncio.run(client.get_pod(tenant, "no-such-pod")) is None  # the new token
