"""The real-cluster suite: kube-apiserver, etcd and kube-controller-manager started here.

Uses ``../shared/kube`` (or ``$NIXIMAGE_KUBE_BIN``) and Debian's etcd: without them every
test here skips with one line saying what is missing. The session starts the control plane
(kubesupport.controlplane), applies the CRD and the identities exactly as the chart
renders them (the operator's and the registry's ServiceAccounts, roles, bindings), with
pull authorisation by service account tokens on, starts the kubelet stand-in as node
``node-amd64`` with the storage claim mapped to a directory here, and runs ``niximage
operator`` with the chart's environment and a token of the chart's service account from
the TokenRequest API. The operator's storage is that directory (in a cluster, the claim
mounted at the same path in the operator and in builder pods).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubesupport import cluster, controlplane
from kubesupport.cluster import Chart, Cluster, Kubectl, NodeThread, OperatorProcess, eventually
from kubesupport.kubelet import Connection

ROOT = Path(__file__).resolve().parents[2]
TESTPKGS = ROOT / "nix" / "testpkgs"
REGISTRY = "registry.test:5000"
STORAGE_CLAIM = "niximage-storage"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.cluster)


def _pinned_testpkgs() -> str:
    narhash = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "hash", "path",
         "--type", "sha256", "--sri", str(TESTPKGS)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return f"path:{TESTPKGS}#{narhash}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    if os.environ.get("KUBECONFIG"):
        pytest.skip(
            "real-cluster suite: KUBECONFIG is set, and this suite starts its own control "
            "plane and kubelet stand-in (unset KUBECONFIG to run it)"
        )
    try:
        controlplane.kube_binaries()
        controlplane.etcd_binary()
    except controlplane.Unavailable as exc:
        pytest.skip(f"real-cluster suite: {exc}")
    plane = controlplane.ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube(
    control_plane: controlplane.ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    from kubesupport import helmtool

    admin = Kubectl(helmtool.ensure_kubectl(), control_plane.admin_kubeconfig)
    # kubectl validates against /openapi/v2, which can answer 503 just after start.
    eventually(lambda: admin.run("apply", "-f", str(cluster.CRD), check=False).returncode == 0,
               what="the CRD applied")  # fmt: skip
    admin.run("wait", "--for=condition=Established", "crd/niximages.niximage.dev")
    admin.apply({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": cluster.SYSTEM_NAMESPACE}})  # fmt: skip
    storage = tmp_path_factory.mktemp("storage")
    chart = Chart.render(
        {
            "storage.type": "filesystem",
            "packageSource.default": _pinned_testpkgs(),
            # The follow tests' local git repositories (tests/cluster/test_follow.py).
            "packageSource.allowed[0]": "git:file:///*",
            "registry.host": REGISTRY,
            # Pull authorisation by service account tokens: the operator keeps pull Secrets.
            "registry.auth.enabled": "true",
            "registry.auth.kubernetes": "true",
        }
    )
    admin.apply(*chart.identity)
    kubeconfig = cluster.token_kubeconfig(
        admin,
        control_plane.url,
        control_plane.pki / "ca.crt",
        chart.service_account,
        tmp_path_factory.mktemp("operator") / "kubeconfig",
    )
    node = NodeThread(
        Connection(control_plane.url, control_plane.ssl_context()), {STORAGE_CLAIM: storage}
    )
    node.start()
    operator = OperatorProcess.from_chart(
        chart,
        kubeconfig,
        {
            # The claim is mounted here, at this path, for the operator and builder pods.
            "NIXIMAGE_OPERATOR_STORAGE": str(storage),
            "NIXIMAGE_STORAGE": str(storage),
            "NIXIMAGE_OPERATOR_LIVENESS": f"http://127.0.0.1:{_free_port()}/healthz",
            # spec.follow at test speed (the chart's minimum is 1m).
            "NIXIMAGE_OPERATOR_FOLLOW_MIN_INTERVAL": "1s",
        },
        kubeconfig.parent / "operator.log",
    )
    operator.start()
    found = Cluster(control_plane, admin, chart, operator, storage, node, kubeconfig)
    try:
        yield found
    finally:
        operator.stop()
        node.stop()


@pytest.fixture
def tenant(kube: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace at Pod Security's ``restricted`` level; deleted afterwards."""
    name = f"t-{request.node.name.removeprefix('test_')[:40].replace('_', '-')}".rstrip("-")
    kube.admin.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        }
    )
    cluster.wait_for_default_service_account(kube.admin, name)
    kube.admin.apply(kube.chart.builder_service_account(name))
    yield name
    kube.admin.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator_running(kube: Cluster) -> Cluster:
    """The operator is up (a test before may have stopped it); fails with its log if not."""
    if not kube.operator.alive():
        kube.operator.start()
    return kube
