"""The chart's RBAC grants exactly what the operator asks of the API server.

Two checks:

1. Static (helm only): the rendered ClusterRole, or the Roles of namespaced mode, grant
   exactly ``NEEDED`` (plus, namespaced, kopf's cluster-wide reads), bound to the
   operator's service account, and nothing else.
2. Live (real Nix builds): the operator runs in-process against the emulated API server of
   tests/operator, which here *enforces* the rendered RBAC: every request of the
   operator's two clients (kopf's and kube.py's, told apart by User-Agent) that the
   chart's rules do not allow is answered 403, as a real API server would. A scenario that
   walks every code path that talks to the API (create, a shared build, a spec change, a
   deletion) must end Ready with no request refused, and must use every
   rule the chart grants: so nothing is missing and nothing is granted in vain.

``NEEDED`` is what the emulator recorded over the whole operator test suite (and what
kube.py and kopf's documented needs predict); the live test keeps it honest.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio
import yaml

from kubesupport.helmtool import CHART, ROOT, render
from niximage_operator import running
from niximage_operator.settings import ENV_PREFIX

# The operator tests' harness: the emulated API server, kubelet and helpers.
OPERATOR_TESTS = ROOT / "tests" / "operator"
if str(OPERATOR_TESTS) not in sys.path:
    sys.path.insert(0, str(OPERATOR_TESTS))

import kmock  # noqa: E402
from apiserver import ApiError, ApiServer  # noqa: E402
from operator_harness import (  # noqa: E402
    CRD_PATH,
    TESTPKGS,
    RunningOperator,
    apply,
    change_spec,
    delete,
    eventually,
    image,
    kubeconfig_for,
    nix_image,
    operator_settings,
    ready,
)

from kubesupport.kubelet import Gate, Kubelet, ProcessRuntime  # noqa: E402

pytestmark = [pytest.mark.helm, pytest.mark.usefixtures("helm_binary")]

Access = tuple[str, str, str]
"""(verb, API group, resource[/subresource]), in RBAC's terms."""

NEEDED: frozenset[Access] = frozenset(
    {
        # kopf lists and watches NixImages and patches its annotations onto
        # them; kube.py reads one before recording a builder pod in its status.
        ("get", "niximage.dev", "niximages"),
        ("list", "niximage.dev", "niximages"),
        ("watch", "niximage.dev", "niximages"),
        ("patch", "niximage.dev", "niximages"),
        # Status goes only through the subresource (kopf's patches and kube.py's).
        ("patch", "niximage.dev", "niximages/status"),
        # Builder pods: created, read, listed and watched by label, given a second owner.
        ("create", "", "pods"),
        ("get", "", "pods"),
        ("list", "", "pods"),
        ("watch", "", "pods"),
        ("patch", "", "pods"),
        # One Event per condition change.
        ("create", "", "events"),
        # kopf follows CRDs (cluster-scoped).
        ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
        ("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
    }
)
CLUSTER_SCOPED_NEEDS: frozenset[Access] = frozenset(
    a for a in NEEDED if a[2] == "customresourcedefinitions"
)
NAMESPACED_MODE_SCAN: frozenset[Access] = CLUSTER_SCOPED_NEEDS | {
    # With a namespace list, kopf also follows namespaces (cluster-scoped).
    ("list", "", "namespaces"),
    ("watch", "", "namespaces"),
}
OPERATOR_AGENTS = ("kopf/", "niximage-operator/")
RELEASE_NAMESPACE = "niximage-system"
ALL = "*"
"""Scope of a ClusterRole bound cluster-wide: every namespace, and cluster-scoped objects."""

Grant = tuple[str, str, str, str]
"""(verb, group, resource, scope): scope is a namespace, or ALL."""


def operator_account(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = [
        o
        for o in objects
        if o["kind"] == "Deployment"
        and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]
    return {
        "kind": "ServiceAccount",
        "name": deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "namespace": RELEASE_NAMESPACE,
    }


def grants(objects: list[dict[str, Any]]) -> set[Grant]:
    """What the rendered RBAC allows the operator's service account, and where."""
    subject = operator_account(objects)
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    found: set[Grant] = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if subject not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace")
        role_namespace = namespace if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_namespace, ref["name"])]
        scope = ALL if binding["kind"] == "ClusterRoleBinding" else namespace
        for rule in role["rules"]:
            assert not rule.get("resourceNames"), "no rule is limited to names"
            for verb in rule["verbs"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        assert "*" not in (verb, group, resource), f"wildcard in {rule}"
                        found.add((verb, group, resource, scope))
    return found


def unscoped(found: set[Grant]) -> set[Access]:
    return {(verb, group, resource) for verb, group, resource, _ in found}


# ---- static -------------------------------------------------------------------------------


def test_cluster_wide_mode_grants_exactly_what_the_operator_needs() -> None:
    objects = render()
    assert grants(objects) == {(*access, ALL) for access in NEEDED}
    kinds = {o["kind"] for o in objects}
    assert "Role" not in kinds and "RoleBinding" not in kinds


def test_namespaced_mode_grants_namespaced_needs_only_in_watched_namespaces() -> None:
    objects = render((CHART / "ci" / "namespaced-filesystem-values.yaml",))
    namespaced = NEEDED - CLUSTER_SCOPED_NEEDS
    expected = {(*a, ns) for a in namespaced for ns in ("team-a", "team-b")}
    expected |= {(*a, ALL) for a in NAMESPACED_MODE_SCAN}
    assert grants(objects) == expected
    # Nothing namespaced is granted cluster-wide.
    assert {g for g in grants(objects) if g[3] == ALL} == {(*a, ALL) for a in NAMESPACED_MODE_SCAN}


def test_no_rbac_when_disabled() -> None:
    objects = render(sets={"rbac.create": "false"})
    assert not [o for o in objects if "Role" in o["kind"]]


def test_builder_pods_get_no_api_access() -> None:
    """Builder pods never talk to the API: their account is bound to nothing and mounts
    no token."""
    objects = render((CHART / "ci" / "namespaced-filesystem-values.yaml",))
    builders = [
        o
        for o in objects
        if o["kind"] == "ServiceAccount" and o["metadata"]["name"].endswith("-builder")
    ]
    assert builders and all(sa["automountServiceAccountToken"] is False for sa in builders)
    bound = {
        subject["name"]
        for o in objects
        if o["kind"].endswith("Binding")
        for subject in o["subjects"]
    }
    assert bound == {operator_account(objects)["name"]}


# ---- live ---------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class EnforcingApiServer(ApiServer):
    """The emulated API server, refusing the operator what the chart's RBAC does not grant."""

    grants: frozenset[Grant] = frozenset()
    denied: list[tuple[str, str, str, str | None]] = attrs.field(factory=list, init=False)

    async def _handle(self, request: Any) -> Any:
        if request.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
            asked = self.access_of(request)
            if asked is not None and not self._allowed(*asked):
                self.denied.append(asked)
                verb, group, resource, namespace = asked
                where = f"in namespace {namespace!r}" if namespace else "at the cluster scope"
                return self._error(
                    ApiError(403, "Forbidden", f"cannot {verb} {group}/{resource} {where}")
                )
        return await super()._handle(request)

    def _allowed(self, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        if (verb, group, resource, ALL) in self.grants:
            return True
        return namespace is not None and (verb, group, resource, namespace) in self.grants


@pytest.fixture(scope="module")
def testpkgs_source() -> str:
    if shutil.which("nix") is None:
        pytest.skip("needs Nix (the builder runs for real)")
    narhash = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "hash", "path",
         "--type", "sha256", "--sri", str(TESTPKGS)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    return f"path:{TESTPKGS}#{narhash}"


@pytest.fixture(autouse=True)
def no_ultimate_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in tests/operator: kopf would SIGKILL the test process long after a cancel."""
    tuned = running.kopf_settings

    def kopf_settings(config: Any) -> Any:
        settings = tuned(config)
        settings.process.ultimate_exiting_timeout = None
        return settings

    monkeypatch.setattr(running, "kopf_settings", kopf_settings)


def chart_namespaces(objects: list[dict[str, Any]]) -> list[str]:
    (deployment,) = [
        o
        for o in objects
        if o["kind"] == "Deployment"
        and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]
    operator = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    value = env.get(f"{ENV_PREFIX}NAMESPACES") or ""
    return [part for part in value.split(",") if part]


@pytest_asyncio.fixture
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[EnforcingApiServer, list[str]]]:
    objects = render(*request.param)
    server = EnforcingApiServer(grants=frozenset(grants(objects)))
    async with server, kmock.Server(server) as http:
        server.install_crd(yaml.safe_load(CRD_PATH.read_text()))
        for namespace in ("default", RELEASE_NAMESPACE, "team-a", "team-b"):
            server.create_namespace(namespace)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(str(http.url).rstrip("/"))))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield server, chart_namespaces(objects)


def generation_ready(server: ApiServer, name: str, namespace: str, generation: int) -> bool:
    status = (ready(server, name, namespace) or {}).get("status", {})
    return bool(status.get("observedGeneration") == generation)


MODES = [
    pytest.param(((),), id="cluster-wide"),
    pytest.param(((CHART / "ci" / "namespaced-filesystem-values.yaml",),), id="namespaced"),
]


@pytest.mark.nix
@pytest.mark.asyncio
@pytest.mark.parametrize("cluster", MODES, indirect=True)
async def test_the_operator_works_within_the_charts_rbac_and_uses_all_of_it(
    cluster: tuple[EnforcingApiServer, list[str]], testpkgs_source: str, tmp_path: Path
) -> None:
    server, watched = cluster
    namespace = watched[0] if watched else "default"
    storage = tmp_path / "storage"
    storage.mkdir()
    gate = Gate(open_=False)
    kubelet = Kubelet(str(server.url), ProcessRuntime(gate))
    await kubelet.start()
    operator = RunningOperator(operator_settings(storage, testpkgs_source, namespaces=watched))
    try:
        await operator.start()
        # Two NixImages with the same packages share one builder pod: the second adopts it
        # (pods: get, patch). The kubelet holds the pod until both wait for it.
        await apply(server, nix_image("first", ["jq", "bash"]), namespace)
        await apply(server, nix_image("second", ["bash", "jq"]), namespace)
        await eventually(
            lambda: image(server, "second", namespace).get("status", {}).get("builderPod"),
            timeout=30,
        )
        gate.open()
        await eventually(lambda: ready(server, "first", namespace), timeout=120)
        await eventually(lambda: ready(server, "second", namespace), timeout=60)
        # A spec change builds anew; a deletion removes the tag.
        await change_spec(server, "first", {"packages": ["jq"]}, namespace)
        await eventually(lambda: generation_ready(server, "first", namespace, 2), timeout=120)
        await delete(server, "second", namespace)
        await eventually(lambda: not image(server, "second", namespace), timeout=30)
    finally:
        await operator.stop()
        await kubelet.stop()

    assert server.denied == [], f"the chart's RBAC refused the operator: {server.denied}"
    assert operator.error is None
    used = server.accesses(OPERATOR_AGENTS)
    granted = unscoped(set(server.grants))
    assert used == granted, (
        f"granted but never used: {sorted(granted - used)}; "
        f"used but not granted: {sorted(used - granted)}"
    )
