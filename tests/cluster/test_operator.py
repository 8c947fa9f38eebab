"""The operator on a real kube-apiserver, with the chart's identity, driven with kubectl.

Each test has a namespace of its own at Pod Security's ``restricted`` level and a package
set no other test builds (storage is shared by the session, and a stored build would
short-cut the scenario). Builds run for real: the kubelet stand-in runs each builder pod's
``niximage build`` on the offline package set. The order matters only at the end: the
uninstall test takes the operator away and brings it back, and the last test reads the
audit log of everything before it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesupport import cluster, helmtool
from kubesupport.cluster import Cluster, condition, eventually
from niximage_core import layout
from niximage_core.digest import Digest
from niximage_core.storage import factory
from testsupport import require_arm64

API_VERSION = "niximage.dev/v1alpha1"
BUILD_TIMEOUT = 300.0
POD_SELECTOR = "app.kubernetes.io/managed-by=niximage-operator"


def nix_image(name: str, packages: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "NixImage",
        "metadata": {"name": name},
        "spec": {"packages": packages, **spec},
    }


def image(kube: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return kube.admin.get("nimg", name, namespace) or {}


def wait_reason(kube: Cluster, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = image(kube, namespace, name)
        if condition(obj).get("reason") == reason:
            return obj
        assert kube.operator.alive(), f"the operator exited:\n{kube.operator.tail()}"
        return None

    return eventually(reached, BUILD_TIMEOUT, f"{namespace}/{name} becomes {reason}")


def tag_of(kube: Cluster, repository: str, tag: str) -> str | None:
    digest = layout.read_tag(factory.open_storage(str(kube.storage)), repository, tag)
    return str(digest) if digest is not None else None


def builder_pods(kube: Cluster, namespace: str) -> list[dict[str, Any]]:
    return kube.admin.items("pods", namespace, POD_SELECTOR)


def create(kube: Cluster, namespace: str, body: dict[str, Any]) -> None:
    kube.admin.run("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


def test_the_crd_is_structural_and_established(kube: Cluster) -> None:
    crd = kube.admin.get("crd", "niximages.niximage.dev")
    assert crd is not None
    kinds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert kinds.get("Established") == "True" and kinds.get("NamesAccepted") == "True"
    assert "NonStructuralSchema" not in kinds, crd["status"]["conditions"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"packages": ["$(reboot)"]}, "spec.packages[0]: Invalid value"),
        ({"packages": []}, "spec.packages: Invalid value"),
        ({"packages": ["jq"], "arch": "sparc"}, 'Unsupported value: "sparc"'),
        ({"packages": ["jq"], "architectures": []}, "spec.architectures: Invalid value"),
        (
            {"packages": ["jq"], "architectures": ["amd64", "riscv64"]},
            'Unsupported value: "riscv64"',
        ),
        ({"packages": ["jq"], "architectures": ["arm64", "arm64"]}, "Duplicate value"),
        (
            {"packages": ["jq"], "arch": "arm64", "architectures": ["arm64"]},
            "give arch or architectures, not both",
        ),
        (
            {"packages": ["jq"], "format": "docker", "compression": "zstd"},
            "format docker has no zstd layers",
        ),
        ({"packages": ["jq"], "tag": "-bad"}, "spec.tag: Invalid value"),
        ({"packages": ["jq"], "surprise": 1}, 'unknown field "spec.surprise"'),
    ],
)
def test_the_server_refuses_bad_specs_with_the_schemas_message(
    kube: Cluster, spec: dict[str, Any], message: str
) -> None:
    body = {"apiVersion": API_VERSION, "kind": "NixImage", "metadata": {"name": "bad"}}
    proc = kube.admin.run(
        "create", "-n", "default", "--validate=strict", "-f", "-",
        input=yaml.safe_dump({**body, "spec": spec}), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert kube.admin.get("nimg", "bad", "default") is None


def test_apply_wait_describe_retag_delete(operator_running: Cluster, tenant: str) -> None:
    kube = operator_running
    kube.admin.apply(nix_image("jq", ["jq"], tag="1.0"), namespace=tenant)
    kube.admin.run(
        "wait", "--for=condition=Ready", "nimg/jq", "-n", tenant,
        f"--timeout={BUILD_TIMEOUT:.0f}s", timeout=BUILD_TIMEOUT + 10,
    )  # fmt: skip
    obj = image(kube, tenant, "jq")
    status = obj["status"]
    assert status["digest"].startswith("sha256:")
    assert status["image"] == f"registry.test:5000/{tenant}/jq:1.0"
    assert status["imageDigest"] == f"registry.test:5000/{tenant}/jq@{status['digest']}"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert tag_of(kube, f"{tenant}/jq", "1.0") == status["digest"]
    assert "finalizers" not in obj["metadata"], "deletion must never wait for the operator"
    # Printer columns and events, as a person reads them.
    table = kube.admin.run("get", "nimg", "-n", tenant).stdout
    header, row = table.splitlines()
    assert header.split() == ["NAME", "TAG", "ARCH", "READY", "REASON", "IMAGE", "AGE"], table
    assert row.split()[:5] == ["jq", "1.0", "amd64", "True", "Succeeded"], table
    assert "True" in table and "Succeeded" in table
    wide = kube.admin.run("get", "nimg", "-n", tenant, "-o", "wide").stdout
    assert "DIGEST" in wide.splitlines()[0] and status["digest"] in wide
    described = kube.admin.run("describe", "nimg", "jq", "-n", tenant).stdout
    assert "Events:" in described and "Succeeded" in described and "niximage-operator" in described
    # The builder pod was admitted at "restricted", is owned by the NixImage, succeeded.
    (pod,) = builder_pods(kube, tenant)
    assert pod["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert pod["status"]["phase"] == "Succeeded"

    # A new tag moves the image's name; the old tag goes from storage.
    kube.admin.apply(nix_image("jq", ["jq"], tag="2.0"), namespace=tenant)
    eventually(
        lambda: image(kube, tenant, "jq").get("status", {}).get("image", "").endswith(":2.0"),
        60,
        "status names tag 2.0",
    )
    assert tag_of(kube, f"{tenant}/jq", "2.0") == status["digest"]
    assert tag_of(kube, f"{tenant}/jq", "1.0") is None

    # Deleting is immediate (no finalizer); the tag goes; the garbage collector takes the pod.
    kube.admin.run("delete", "nimg", "jq", "-n", tenant, "--timeout=20s")
    eventually(lambda: tag_of(kube, f"{tenant}/jq", "2.0") is None, 60, "the tag is removed")
    eventually(lambda: not builder_pods(kube, tenant), 60, "the builder pod is collected")


def test_an_image_of_two_architectures_becomes_one_index(
    operator_running: Cluster, tenant: str
) -> None:
    """spec.architectures: one builder pod (on an amd64 node, its Nix building arm64
    through qemu) makes both images and the index; status names all three digests."""
    require_arm64()
    kube = operator_running
    kube.admin.apply(nix_image("both", ["attr"], architectures=["amd64", "arm64"]),
                     namespace=tenant)  # fmt: skip
    status = wait_reason(kube, tenant, "both", "Succeeded")["status"]
    assert [p["architecture"] for p in status["platforms"]] == ["amd64", "arm64"]
    index = factory.open_storage(str(kube.storage))
    with index.open_blob(Digest.parse(status["digest"])) as stream:
        manifests = json.loads(stream.read())["manifests"]
    assert [(m["platform"]["architecture"], m["digest"]) for m in manifests] == [
        (p["architecture"], p["digest"]) for p in status["platforms"]
    ]
    assert tag_of(kube, f"{tenant}/both", "latest") == status["digest"]
    (pod,) = builder_pods(kube, tenant)
    assert pod["spec"]["nodeSelector"]["kubernetes.io/arch"] == "amd64"
    table = kube.admin.run("get", "nimg", "both", "-n", tenant).stdout
    assert table.splitlines()[1].split()[:3] == ["both", "latest", "amd64,arm64"], table
    # Both arch and architectures: the API server refuses, with the rule's message.
    both = nix_image("bad", ["attr"], arch="arm64", architectures=["arm64"])
    refused = kube.admin.run("apply", "-n", tenant, "-f", "-", input=yaml.safe_dump(both),
                             check=False)  # fmt: skip
    assert refused.returncode != 0 and "give arch or architectures, not both" in refused.stderr


def test_missing_packages_are_final_until_the_spec_changes(
    operator_running: Cluster, tenant: str
) -> None:
    kube = operator_running
    kube.admin.apply(nix_image("broken", ["bash", "nope", "python3.nope"]), namespace=tenant)
    obj = wait_reason(kube, tenant, "broken", "MissingPackages")
    assert obj["status"]["missingPackages"] == ["nope", "python3.nope"]
    assert obj["status"]["phase"] == "Failed"
    time.sleep(5)
    assert len(builder_pods(kube, tenant)) == 1, "a missing package is not retried"
    kube.admin.apply(nix_image("broken", ["bash"]), namespace=tenant)
    fixed = wait_reason(kube, tenant, "broken", "Succeeded")
    assert fixed["status"]["observedGeneration"] == 2


def test_two_nix_images_share_one_builder_pod(operator_running: Cluster, tenant: str) -> None:
    kube = operator_running
    kube.admin.apply(nix_image("one", ["nano", "busybox"]), nix_image("two", ["busybox", "nano"]),
                     namespace=tenant)  # fmt: skip
    first = wait_reason(kube, tenant, "one", "Succeeded")
    second = wait_reason(kube, tenant, "two", "Succeeded")
    assert first["status"]["digest"] == second["status"]["digest"]
    pods = builder_pods(kube, tenant)
    assert len(pods) == 1
    owners = {ref["name"] for ref in pods[0]["metadata"]["ownerReferences"]}
    assert owners <= {"one", "two"} and len(owners) >= 1


def test_an_operator_killed_mid_build_leaves_one_pod(
    operator_running: Cluster, tenant: str
) -> None:
    kube = operator_running
    kube.admin.apply(nix_image("slow", ["python3", "coreutils"]), namespace=tenant)
    eventually(lambda: builder_pods(kube, tenant), 60, "a builder pod")
    kube.operator.kill()
    kube.operator.start()
    obj = wait_reason(kube, tenant, "slow", "Succeeded")
    assert len(builder_pods(kube, tenant)) == 1 and obj["status"]["attempts"] == 1


def test_the_operator_outlives_an_api_server_outage(operator_running: Cluster, tenant: str) -> None:
    kube = operator_running
    kube.admin.apply(nix_image("outage", ["moreutils"]), namespace=tenant)
    eventually(lambda: builder_pods(kube, tenant), 60, "a builder pod")
    kube.plane.stop_apiserver()
    time.sleep(20)  # the build finishes meanwhile; the kubelet waits to report it
    assert kube.operator.alive(), kube.operator.tail()
    kube.plane.start_apiserver()
    kube.plane.wait_ready()
    wait_reason(kube, tenant, "outage", "Succeeded")
    kube.admin.apply(nix_image("after", ["moreutils", "bash"]), namespace=tenant)
    wait_reason(kube, tenant, "after", "Succeeded")


def test_gitops_server_side_apply_never_conflicts_with_the_operator(
    operator_running: Cluster, tenant: str
) -> None:
    kube = operator_running
    manager = "argocd-controller"
    kube.admin.apply(nix_image("app", ["tzdata"], tag="v1"), namespace=tenant,
                     server_side="true", field_manager=manager)  # fmt: skip
    wait_reason(kube, tenant, "app", "Succeeded")
    # The operator wrote status and kopf's annotations; the GitOps tool applies a change
    # without --force-conflicts: nothing the operator owns overlaps what it applies.
    kube.admin.apply(nix_image("app", ["tzdata"], tag="v2"), namespace=tenant,
                     server_side="true", field_manager=manager)  # fmt: skip
    eventually(
        lambda: image(kube, tenant, "app").get("status", {}).get("image", "").endswith(":v2"),
        60,
        "the new tag is served",
    )
    shown = kube.admin.run(
        "get", "nimg", "app", "-n", tenant, "-o", "json", "--show-managed-fields"
    )
    fields = json.loads(shown.stdout)["metadata"]["managedFields"]
    spec_owners = {entry["manager"] for entry in fields if "f:spec" in entry.get("fieldsV1", {})}
    assert spec_owners == {manager}, fields


def test_a_pull_secret_due_for_renewal_gets_a_new_token(
    operator_running: Cluster, tenant: str
) -> None:
    """Every namespace with NixImages gets the pull Secret (whatever the build's outcome);
    a token past half its lifetime is replaced, here at the operator's restart."""
    kube = operator_running
    kube.admin.apply(nix_image("puller", ["no-such-package"]), namespace=tenant)
    eventually(
        lambda: (
            image(kube, tenant, "puller").get("status", {}).get("pullSecret") == "niximage-pull"
            or None
        ),
        BUILD_TIMEOUT,
        "status.pullSecret",
    )
    secret = kube.admin.get("secret", "niximage-pull", tenant) or {}
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    expires = "niximage.dev/token-expires"
    kube.admin.run("annotate", "--overwrite", "-n", tenant, "secret/niximage-pull",
                   f"{expires}=2000-01-01T00:00:00Z")  # fmt: skip
    assert kube.operator.stop() == 0, kube.operator.tail()
    kube.operator.start()

    def renewed() -> dict[str, Any] | None:
        now = kube.admin.get("secret", "niximage-pull", tenant) or {}
        stamp = now.get("metadata", {}).get("annotations", {}).get(expires)
        return now if stamp not in (None, "2000-01-01T00:00:00Z") else None

    fresh = eventually(renewed, 60, "the pull Secret renewed")
    assert fresh["data"] != secret["data"]


def test_helm_install_dry_run_against_the_server(kube: Cluster, tmp_path: Path) -> None:
    """The chart's kubeVersion admits this server, and the server accepts every object."""
    version = kube.admin.run("version", "-o", "json").stdout
    assert '"minor": "36"' in version
    proc = helmtool.helm(
        "install", "probe", str(helmtool.CHART), "--namespace", "default",
        "--dry-run=server", "--set", "storage.type=filesystem",
        kubeconfig=kube.plane.admin_kubeconfig, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "STATUS: pending-install" in proc.stdout


def test_uninstalling_the_operator_first_leaves_no_namespace_stuck(
    operator_running: Cluster, tenant: str
) -> None:
    kube = operator_running
    kube.admin.apply(nix_image("kept", ["openssl"]), namespace=tenant)
    digest = wait_reason(kube, tenant, "kept", "Succeeded")["status"]["digest"]
    assert tag_of(kube, f"{tenant}/kept", "latest") == digest
    # Uninstall: the operator goes, and so does its identity.
    assert kube.operator.stop() == 0, kube.operator.tail()
    kube.admin.run("delete", "-f", "-", input=yaml.safe_dump_all(kube.chart.identity))
    kube.admin.run("delete", "namespace", tenant, "--timeout=90s", timeout=120)
    assert kube.admin.get("namespace", tenant) is None
    # Install again: at start the operator removes the tag of the NixImage that went.
    kube.admin.apply(*kube.chart.identity)
    cluster.token_kubeconfig(
        kube.admin, kube.plane.url, kube.plane.pki / "ca.crt", kube.chart.service_account,
        kube.operator_kubeconfig,
    )  # fmt: skip
    kube.operator.start()
    eventually(lambda: tag_of(kube, f"{tenant}/kept", "latest") is None, 60, "the tag is swept")


def test_the_charts_rbac_is_exactly_what_the_operator_uses(
    kube: Cluster, request: pytest.FixtureRequest
) -> None:
    """Least privilege, by the real authoriser: no request refused, every rule used."""
    events = kube.audit()
    assert events, "no request of the operator in the audit log"
    # Refused by the authoriser: a 403 that RBAC did not allow. (Admission refuses with 403
    # too, e.g. a create in a namespace a test is deleting; RBAC had allowed those.)
    refused = sorted({(cluster.rule_of(e), e["requestURI"]) for e in events
                      if e.get("responseStatus", {}).get("code") == 403
                      and e.get("annotations", {}).get("authorization.k8s.io/decision")
                      != "allow"})  # fmt: skip
    assert not refused, f"the chart's RBAC refused the operator: {refused}"
    module = Path(__file__).name
    ran = {item.originalname for item in request.session.items if item.fspath.basename == module}
    if len(ran) < len([name for name in globals() if name.startswith("test_")]):
        pytest.skip("every rule is used only by the whole module: run it all")
    used = {cluster.rule_of(e) for e in events}
    unused = kube.chart.rules() - used
    assert not unused, f"the chart grants what the operator never uses: {sorted(unused)}"
