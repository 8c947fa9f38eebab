"""Pull authorisation the Kubernetes way, on the real API server (TokenReview and
SubjectAccessReview, as OpenShift's integrated registry does).

Two tenant namespaces each get a NixImage. The operator (with the chart's identity and
environment) keeps a pull Secret in each; a registry process runs with ``--auth-kubernetes``
and a token of the chart's registry service account, whose only rights are
``system:auth-delegator``'s. Then:

- skopeo, with a service account token of namespace A as the password, copies A's image
  and is refused B's (401/403 with the spec's JSON);
- containerd's CRI pull with the credentials of A's pull Secret, as kubelet passes them,
  pulls A's image and not B's.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubesupport import cluster
from kubesupport.cluster import Cluster, eventually
from tests.cluster.test_operator import BUILD_TIMEOUT, nix_image
from tests.registry.support import RegistryProcess
from testsupport import require

REGISTRY_HOST = "registry.test:5000"


def _named(chart: cluster.Chart, kind: str, suffix: str) -> str:
    names = [obj["metadata"]["name"] for obj in chart.of_kind(kind)]
    found = [name for name in names if name.endswith(suffix)]
    if not found:
        pytest.fail(f"the chart renders no {kind} named *{suffix} (it has {names})")
    return found[0]


def _namespace(kube: Cluster, name: str) -> str:
    kube.admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    cluster.wait_for_default_service_account(kube.admin, name)
    kube.admin.apply(kube.chart.builder_service_account(name))
    return name


def _ready(kube: Cluster, namespace: str, name: str) -> dict[str, Any]:
    kube.admin.run(
        "wait", "--for=condition=Ready", f"nimg/{name}", "-n", namespace,
        f"--timeout={BUILD_TIMEOUT:.0f}s", timeout=BUILD_TIMEOUT + 10,
    )  # fmt: skip
    return kube.admin.get("nimg", name, namespace) or {}


@pytest.fixture(scope="module")
def tenants(kube: Cluster) -> Iterator[dict[str, dict[str, Any]]]:
    """Namespaces ``pull-a`` and ``pull-b``, each with a Ready NixImage."""
    if not kube.operator.alive():
        kube.operator.start()
    found = {}
    for namespace, packages in (("pull-a", ["xz"]), ("pull-b", ["bzip2"])):
        _namespace(kube, namespace)
        kube.admin.apply(nix_image("app", packages, tag="1"), namespace=namespace)
    for namespace in ("pull-a", "pull-b"):
        found[namespace] = _ready(kube, namespace, "app")
    yield found
    for namespace in found:
        kube.admin.run("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def replicas(kube: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two replicas of ``niximage serve --auth-kubernetes``, as the chart runs them: the
    registry's service account, one token signing key, the storage read-only."""
    account = _named(kube.chart, "ServiceAccount", "-registry")
    work = tmp_path_factory.mktemp("registry")
    kubeconfig = cluster.token_kubeconfig(
        kube.admin, kube.plane.url, kube.plane.pki / "ca.crt", account, work / "kubeconfig"
    )
    key = work / "token-key"
    key.write_text(secrets.token_urlsafe(48))
    flags = ("--auth-kubernetes", f"--auth-secret-file={key}")
    env = {"KUBECONFIG": str(kubeconfig)}
    with (
        RegistryProcess(kube.storage, *flags, env=env) as one,
        RegistryProcess(kube.storage, *flags, env=env) as two,
    ):
        yield [one.address, two.address]


@pytest.fixture(scope="module")
def registry(replicas: list[str]) -> str:
    return replicas[0]


def _token(kube: Cluster, namespace: str, account: str) -> str:
    return kube.admin.run("create", "token", account, "-n", namespace).stdout.strip()


def _pod_identity(kube: Cluster, namespace: str) -> str:
    """A workload's own service account, given the right to read NixImages here (what a
    tenant does to pull with its pods' tokens); returns a token of it."""
    role = _named(kube.chart, "ClusterRole", "-puller")
    kube.admin.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "workload", "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "workload-pulls", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": "workload",
                       "namespace": namespace}]},
    )  # fmt: skip
    return _token(kube, namespace, "workload")


def _skopeo_copy(
    address: str, repository: str, token: str, target: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", "--src-creds", f"workload:{token}",
         f"docker://{address}/{repository}:1", f"oci:{target}:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _get(url: str, user: str, password: str) -> tuple[int, dict[str, Any]]:
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {credentials}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_operator_keeps_a_pull_secret_in_each_namespace(
    kube: Cluster, tenants: dict[str, dict[str, Any]]
) -> None:
    for namespace, image in tenants.items():
        assert image["status"]["pullSecret"] == "niximage-pull"
        secret = eventually(lambda ns=namespace: kube.admin.get("secret", "niximage-pull", ns),
                            what=f"the pull Secret in {namespace}")  # fmt: skip
        assert secret["type"] == "kubernetes.io/dockerconfigjson"
        config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
        assert list(config["auths"]) == [REGISTRY_HOST]
        account = kube.admin.get("serviceaccount", "niximage-puller", namespace)
        assert account is not None and account.get("automountServiceAccountToken") is False


def test_a_service_account_token_pulls_its_namespace_and_nothing_else(
    kube: Cluster, tenants: dict[str, dict[str, Any]], registry: str, tmp_path: Path
) -> None:
    require("skopeo")
    token = _pod_identity(kube, "pull-a")
    copied = _skopeo_copy(registry, "pull-a/app", token, tmp_path / "a")
    assert copied.returncode == 0, copied.stderr
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == tenants["pull-a"]["status"]["digest"]

    refused = _skopeo_copy(registry, "pull-b/app", token, tmp_path / "b")
    assert refused.returncode != 0
    assert "denied" in refused.stderr.lower() or "unauthorized" in refused.stderr.lower()
    status, body = _get(f"http://{registry}/v2/pull-b/app/manifests/1", "workload", token)
    assert status == 403 and body["errors"][0]["code"] == "DENIED"
    # The token endpoint grants only what the namespace allows: B's scope is left out.
    scope = "repository:pull-b/app:pull"
    status, issued = _get(f"http://{registry}/token?service=niximage&scope={scope}", "x", token)
    assert status == 200
    bearer = urllib.request.Request(
        f"http://{registry}/v2/pull-b/app/manifests/1",
        headers={"Authorization": f"Bearer {issued['token']}"},
    )
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(bearer, timeout=30)
    assert denied.value.code == 401
    assert json.loads(denied.value.read())["errors"][0]["code"] == "UNAUTHORIZED"


def test_a_token_the_api_server_does_not_know_is_refused(
    kube: Cluster, tenants: dict[str, dict[str, Any]], registry: str
) -> None:
    token = _pod_identity(kube, "pull-a")
    kube.admin.run("delete", "serviceaccount", "workload", "-n", "pull-a")

    # TokenReview answers for a deleted account's token are cached briefly (10 s).
    def refused() -> bool | None:
        status, body = _get(f"http://{registry}/v2/pull-a/app/manifests/1", "x", token)
        return (status == 401 and body["errors"][0]["code"] == "UNAUTHORIZED") or None

    eventually(refused, 30, "the deleted account's token refused")


def test_containerd_pulls_with_the_operators_pull_secret(
    kube: Cluster,
    tenants: dict[str, dict[str, Any]],
    registry: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.registry.containerd_node import running_containerd
    from tests.registry.cri import Cri

    secret = kube.admin.get("secret", "niximage-pull", "pull-a") or {}
    auths = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))["auths"]
    credentials = auths[REGISTRY_HOST]
    with running_containerd(tmp_path_factory.mktemp("containerd")) as node:
        # The image references name REGISTRY_HOST; this node reaches it at the test's port.
        hosts = node.certs / REGISTRY_HOST
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts.toml").write_text(
            f'server = "http://{REGISTRY_HOST}"\n\n'
            f'[host."http://{registry}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        cri = Cri(node.socket)
        try:
            # What kubelet does with imagePullSecrets: the Secret's credentials in the CRI
            # PullImageRequest.
            own = tenants["pull-a"]["status"]["image"]
            assert own.startswith(REGISTRY_HOST + "/pull-a/app")
            assert cri.pull(own, credentials["username"], credentials["password"])
            other = tenants["pull-b"]["status"]["image"]
            with pytest.raises(Exception, match=r"403|401|denied|unauthorized"):
                cri.pull(other, credentials["username"], credentials["password"])
        finally:
            cri.close()


def _pull(address: str, repository: str, password: str) -> None:
    """A client's pull: a token from /token with the password, then the manifest and
    every blob it names, with that token. Raises on any failure."""
    status, issued = _get(
        f"http://{address}/token?service=niximage&scope=repository:{repository}:pull",
        "serviceaccount", password,
    )  # fmt: skip
    assert status == 200, issued
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    bearer = {"Authorization": f"Bearer {issued['token']}",
              "Accept": "application/vnd.oci.image.manifest.v1+json"}  # fmt: skip
    url = f"http://{address}/v2/{repository}"
    with opener.open(urllib.request.Request(f"{url}/manifests/1", headers=bearer), timeout=30) as r:
        manifest = json.loads(r.read())
    for blob in [manifest["config"], *manifest["layers"]]:
        request = urllib.request.Request(f"{url}/blobs/{blob['digest']}", headers=bearer)
        with opener.open(request, timeout=30) as response:
            assert len(response.read()) == blob["size"]


def test_two_replicas_serve_pulls_while_the_operator_restarts(
    kube: Cluster, tenants: dict[str, dict[str, Any]], replicas: list[str]
) -> None:
    """The registry is its own service: pulls go on, on both replicas, with tokens one
    replica issued and the other checks, while the operator stops and starts."""
    secret = kube.admin.get("secret", "niximage-pull", "pull-a") or {}
    auths = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))["auths"]
    password = auths[REGISTRY_HOST]["password"]
    done = threading.Event()
    pulls: list[str] = []
    failures: list[str] = []

    def loop() -> None:
        while not done.is_set():
            first, second = replicas if len(pulls) % 2 == 0 else replicas[::-1]
            try:
                _pull(first, "pull-a/app", password)
                # A token from one replica is good on the other (one signing key).
                _pull(second, "pull-a/app", password)
                pulls.append(first)
            except Exception as exc:  # every failure counts
                failures.append(repr(exc))

    puller = threading.Thread(target=loop, daemon=True)
    puller.start()
    try:
        time.sleep(1)
        assert kube.operator.stop() == 0, kube.operator.tail()
        time.sleep(2)
        kube.operator.start()
        eventually(lambda: kube.operator.alive() or None, 30, "the operator back")
        time.sleep(2)
    finally:
        done.set()
        puller.join(60)
    assert failures == []
    assert len(pulls) >= 10 and set(pulls) == set(replicas)
