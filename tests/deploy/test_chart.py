"""The Helm chart, checked offline with a real helm 4 and Kubernetes' own schemas.

For every value set in charts/niximage/ci/: ``helm lint --strict`` passes, ``helm
template`` renders objects that validate strictly against the API schemas of the oldest
Kubernetes the chart supports and of the newest that kubernetes-validate knows, and the
pods follow the rules the chart promises (non-root, read-only root file system, no
capabilities, requests, probes). The settings the chart hands to the operator and the
registry are parsed by their real parsers, so a renamed variable or flag fails here.
values.schema.json turns bad values away with a message that names the value.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import niximage_cli as cli
from kubesupport.helmtool import CHART, CI_VALUES, ROOT, helm, notes, render, template_args
from niximage_operator import podspec, specs
from niximage_operator.settings import ENV_PREFIX, OperatorSettings

pytestmark = [pytest.mark.helm, pytest.mark.usefixtures("helm_binary")]

KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
"""The chart's kubeVersion floor (Chart.yaml) and the newest schemas available offline."""

PINNED = "path:/opt/niximage/nix/testpkgs#sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
"""Stands for the image's /opt/niximage/package-source where the chart reads it at start."""

ids = [path.stem for path in CI_VALUES]


@pytest.fixture(scope="module", params=CI_VALUES, ids=ids)
def rendered(request: pytest.FixtureRequest) -> tuple[Path, list[dict[str, Any]]]:
    return request.param, render((request.param,))


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


COMPONENTS = ("operator", "registry")
"""The chart's two Deployments, by their ``app.kubernetes.io/component``; each pod runs
one container of that name."""


def deployment(objects: list[dict[str, Any]], component: str = "operator") -> dict[str, Any]:
    (found,) = [
        obj
        for obj in by_kind(objects, "Deployment")
        if obj["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return found


def pod_spec(objects: list[dict[str, Any]], component: str = "operator") -> dict[str, Any]:
    spec: dict[str, Any] = deployment(objects, component)["spec"]["template"]["spec"]
    return spec


def container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = pod_spec(objects, name)["containers"]
    assert found["name"] == name
    return dict(found)


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


# ---- the CRD ------------------------------------------------------------------------------


def test_the_charts_crd_is_the_repositorys() -> None:
    """crds/niximage.yaml belongs to the operator; the chart ships a byte-for-byte copy
    (Helm cannot reach outside the chart folder).
    Fix: cp crds/niximage.yaml charts/niximage/crds/"""
    source = (ROOT / "crds" / "niximage.yaml").read_bytes()
    copy = (CHART / "crds" / "niximage.yaml").read_bytes()
    assert copy == source, "charts/niximage/crds/niximage.yaml differs from crds/niximage.yaml"


def test_the_crd_is_installed_with_the_chart() -> None:
    out = helm(*template_args(), "--include-crds").stdout
    crds = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "CustomResourceDefinition"]
    assert [crd["metadata"]["name"] for crd in crds] == ["niximages.niximage.dev"]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(crds[0], version, strict=True)


# ---- lint, render, validate ------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_lint_strict(values: Path) -> None:
    proc = helm("lint", "--strict", str(CHART), "--values", str(values), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_rendered_objects_validate_against_kubernetes_schemas(
    rendered: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                name = f"{obj['kind']}/{obj['metadata']['name']}"
                pytest.fail(f"{name} is invalid for Kubernetes {version}: {exc.message}")


def test_every_object_is_labelled_and_namespaced(
    rendered: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "niximage"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert ("namespace" in obj["metadata"]) == (obj["kind"] not in cluster_scoped), obj


# ---- the pod ----------------------------------------------------------------------------------


def test_one_operator_replaced_never_rolled(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """kopf: one active operator; Recreate, so an upgrade never runs two at once."""
    spec = deployment(rendered[1])["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_the_registry_is_highly_available(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """Two replicas rolled one at a time behind a disruption budget, spread over nodes and
    zones: an upgrade, a drain or the operator's restart leaves pulls up."""
    values_file, objects = rendered
    registry = deployment(objects, "registry")
    spec = registry["spec"]
    assert spec["replicas"] == load_values(values_file).get("registry", {}).get("replicas", 2)
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    operator_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert not spec["selector"]["matchLabels"].items() <= operator_labels.items()
    (budget,) = by_kind(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] == 1
    spread = {c["topologyKey"]: c for c in spec["template"]["spec"]["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert by_kind(objects, "HorizontalPodAutoscaler") == []


def test_the_registry_scales_with_an_autoscaler_when_asked() -> None:
    objects = render(sets={"registry.autoscaling.enabled": "true", "registry.replicas": "3"})
    registry = deployment(objects, "registry")
    assert "replicas" not in registry["spec"]  # the autoscaler's to set
    (autoscaler,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == registry["metadata"]["name"]
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (3, 6)
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["target"]["averageUtilization"] == 70


def test_containers_are_locked_down_with_requests_and_probes(
    rendered: tuple[Path, list[dict[str, Any]]],
) -> None:
    objects = rendered[1]
    for component in COMPONENTS:
        pod = pod_spec(objects, component)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        item = container(objects, component)
        security = item["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["runAsNonRoot"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert {"cpu", "memory"} <= set(item["resources"]["requests"])
        assert "memory" in item["resources"]["limits"]
        assert item["livenessProbe"]["httpGet"]["path"] == "/healthz"
        # A read-only root: /tmp is a volume.
        assert any(m["mountPath"] == "/tmp" for m in item["volumeMounts"])
    registry = container(objects, "registry")
    # Ready means storage answers.
    assert registry["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "registry"}
    # The registry talks to the API server only to check pull tokens.
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    kubernetes_auth = load_values(rendered[0]).get("registry", {}).get("auth", {})
    assert (token_path in {m["mountPath"] for m in registry["volumeMounts"]}) == bool(
        kubernetes_auth.get("enabled") and kubernetes_auth.get("kubernetes")
    )
    assert token_path in {m["mountPath"] for m in container(objects, "operator")["volumeMounts"]}
    # The operator serves no traffic: a startup probe, no readiness.
    operator = container(objects, "operator")
    assert "readinessProbe" not in operator and "startupProbe" in operator
    # Each has its own identity.
    accounts = {pod_spec(objects, component)["serviceAccountName"] for component in COMPONENTS}
    assert len(accounts) == 2


def test_the_service_leads_to_the_registry(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    values_file, objects = rendered
    (service,) = by_kind(objects, "Service")
    registry_labels = deployment(objects, "registry")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= registry_labels.items()
    operator_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= operator_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "registry"
    assert "registry" in {p["name"] for p in container(objects, "registry")["ports"]}
    service_values = load_values(values_file).get("registry", {}).get("service", {})
    assert service["spec"]["type"] == service_values.get("type", "ClusterIP")
    if service_values.get("nodePort"):
        assert port["nodePort"] == service_values["nodePort"]


# ---- what the components are told -------------------------------------------------------


def operator_environment(objects: list[dict[str, Any]]) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in container(objects, "operator")["env"]}
    env.setdefault(f"{ENV_PREFIX}DEFAULT_PACKAGE_SOURCE", PINNED)  # the image's, at start
    return env


def test_operator_environment_is_valid_operator_settings(
    rendered: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real settings parser reads what the chart sets; a variable it does not know
    (pydantic-settings ignores those silently) fails here."""
    settings = operator_settings(rendered[1], monkeypatch)

    values = load_values(rendered[0])
    objects = rendered[1]
    assert settings.builder_image == container(objects, "operator")["image"]
    ports = {p["name"]: p["containerPort"] for p in container(objects, "operator")["ports"]}
    assert settings.metrics_port == ports.get("metrics") == 9090
    assert settings.liveness is not None and settings.liveness.endswith(":8080/healthz")
    assert settings.namespaces == values.get("operator", {}).get("watchNamespaces", [])
    assert settings.nix_store_volume == (
        values.get("builder", {}).get("nixStore") or {"emptyDir": {}}
    )
    if "requests" in values.get("builder", {}).get("resources", {}):
        assert settings.builder_resources["requests"] == values["builder"]["resources"]["requests"]
    # The storage URL: the same for the operator and the registry, and mounted if a path.
    serve = serve_arguments(objects)
    assert serve.storage == settings.storage
    # `kubectl exec … -c operator -- niximage gc` finds the same storage.
    assert operator_environment(objects)["NIXIMAGE_STORAGE"] == settings.storage
    if settings.storage.startswith("/"):
        # The registry only reads: the claim and its mount are read-only.
        mounts = {m["mountPath"]: m for m in container(objects, "registry")["volumeMounts"]}
        assert mounts[settings.storage].get("readOnly") is True
        (claim,) = [v for v in pod_spec(objects, "registry")["volumes"] if v["name"] == "storage"]
        assert claim["persistentVolumeClaim"]["readOnly"] is True
        operator_mounts = {m["mountPath"] for m in container(objects, "operator")["volumeMounts"]}
        assert settings.storage in operator_mounts
        claims = [v for v in pod_spec(objects)["volumes"] if "persistentVolumeClaim" in v]
        assert len(claims) == 1
    else:
        assert settings.storage.startswith("gs://")
    # Builder pods' service account exists in the release namespace when the chart makes it.
    accounts = {
        (sa["metadata"]["namespace"], sa["metadata"]["name"])
        for sa in by_kind(objects, "ServiceAccount")
    }
    if settings.builder_service_account:
        assert ("niximage-system", settings.builder_service_account) in accounts
        for namespace in settings.namespaces:
            assert (namespace, settings.builder_service_account) in accounts


def operator_settings(
    objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> OperatorSettings:
    """The settings the operator container reads from the environment the chart gives it."""
    env = operator_environment(objects)
    ours = {name for name in env if name.startswith(ENV_PREFIX)}
    known = {ENV_PREFIX + field.upper() for field in OperatorSettings.model_fields}
    assert ours - known == set(), f"unknown operator settings: {sorted(ours - known)}"
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(f"{ENV_PREFIX}DEFAULT_PACKAGE_SOURCE", PINNED)
    return OperatorSettings()  # type: ignore[call-arg]


def jq_builder_pod(settings: OperatorSettings, namespace: str) -> dict[str, Any]:
    """The builder pod the operator makes with these settings for a NixImage of jq."""
    sources = specs.PackageSources.configure(settings.default_package_source)
    body = {
        "apiVersion": podspec.API_VERSION,
        "kind": podspec.KIND,
        "metadata": {"name": "jq", "namespace": namespace, "uid": "u1"},
        "spec": {"packages": ["jq"]},
    }
    return podspec.builder_pod(specs.resolve(body, sources), 1, body, settings)


def test_builder_pods_reach_the_storage_as_the_operator_does(
    rendered: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A builder pod the operator makes from the chart's settings mounts the storage claim
    at the storage path, or the GCS key where GOOGLE_APPLICATION_CREDENTIALS points, like
    the operator's own container; and it meets the restricted Pod Security level."""
    objects = rendered[1]
    settings = operator_settings(objects, monkeypatch)
    pod = jq_builder_pod(settings, "niximage-system")
    [builder] = pod["spec"]["containers"]
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in builder.get("volumeMounts", [])}
    operator_volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    operator = container(objects, "operator")
    if settings.storage.startswith("/"):
        [claim] = [v for v in operator_volumes.values() if "persistentVolumeClaim" in v]
        assert mounts[settings.storage] == claim
    env = {e["name"]: e["value"] for e in builder["env"]}
    operator_env = {e["name"]: e.get("value") for e in operator["env"]}
    if "GOOGLE_APPLICATION_CREDENTIALS" in operator_env:
        key = Path(env["GOOGLE_APPLICATION_CREDENTIALS"])
        assert key == Path(operator_env["GOOGLE_APPLICATION_CREDENTIALS"])
        assert mounts[str(key.parent)]["secret"]["secretName"] == "niximage-gcs-key"
    for extra in load_values(rendered[0]).get("builder", {}).get("extraVolumeMounts", []):
        assert extra["mountPath"] in mounts
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert builder["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_builder_pods_are_placed_and_pull_as_the_values_say(
    rendered: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = operator_settings(rendered[1], monkeypatch)
    values = load_values(rendered[0])
    builder = values.get("builder", {})
    assert settings.builder_node_selector == builder.get("nodeSelector", {})
    assert settings.builder_tolerations == builder.get("tolerations", [])
    secrets = builder.get("imagePullSecrets") or values.get("imagePullSecrets", [])
    assert settings.builder_image_pull_secrets == [secret["name"] for secret in secrets]


CACHE_KEY = "cache.example.org-1:" + "A" * 43 + "="


def test_binary_caches_reach_builder_pods_as_flags_and_a_netrc_mount(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sets = {
        "builder.binaryCaches.substituters[0]": "https://cache.example.org",
        "builder.binaryCaches.substituters[1]": "http://attic.build.svc:8080/main",
        "builder.binaryCaches.trustedPublicKeys[0]": CACHE_KEY,
        "builder.binaryCaches.netrcSecret": "cache-netrc",
    }
    settings = operator_settings(render(sets=sets), monkeypatch)
    assert settings.substituters == [
        "https://cache.example.org",
        "http://attic.build.svc:8080/main",
    ]
    assert settings.trusted_public_keys == [CACHE_KEY]
    pod = jq_builder_pod(settings, "team")
    [builder] = pod["spec"]["containers"]
    command = builder["command"]
    pairs = list(itertools.pairwise(command))
    assert ("--substituter", "https://cache.example.org") in pairs
    assert ("--trusted-public-key", CACHE_KEY) in pairs
    assert ("--netrc-file", podspec.NETRC_FILE) in pairs
    (netrc,) = [v for v in pod["spec"]["volumes"] if v["name"] == podspec.NETRC_VOLUME]
    assert netrc["secret"]["secretName"] == "cache-netrc"
    (mount,) = [m for m in builder["volumeMounts"] if m["name"] == podspec.NETRC_VOLUME]
    assert mount["readOnly"] is True
    # What the builder is given, its own command line accepts.
    args = cli.build_parser("build").parse_args(command[1:])
    assert args.substituter == settings.substituters and args.netrc_file == podspec.NETRC_FILE


def test_gc_runs_in_the_operator_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert operator_settings(render(), monkeypatch).gc_interval is None
    enabled = render(sets={"gc.enabled": "true", "gc.interval": "12h", "gc.grace": "2h"})
    settings = operator_settings(enabled, monkeypatch)
    assert (settings.gc_interval, settings.gc_grace) == (12 * 3600, 2 * 3600)


def serve_arguments(objects: list[dict[str, Any]]) -> Any:
    """The registry's command, parsed by ``niximage``'s own parser."""
    command = container(objects, "registry")["command"]
    assert command[:2] == ["niximage", "serve"]
    return cli.build_parser().parse_args(command[1:])


def test_registry_flags_are_niximage_serves(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    values = load_values(rendered[0]).get("registry", {})
    args = serve_arguments(rendered[1])
    assert args.listen == "0.0.0.0:5000"
    assert not args.on_demand  # in a cluster, names come from NixImage resources
    auth = values.get("auth", {})
    if auth.get("enabled"):
        mounts = {m["mountPath"] for m in container(rendered[1], "registry")["volumeMounts"]}
        assert args.auth_users in mounts
        # Every replica signs with the same key: the given Secret's, or the chart's own.
        assert str(Path(args.auth_secret_file).parent) in mounts
        assert args.auth_anonymous_pull == auth.get("anonymousPull", False)
        assert args.auth_kubernetes == auth.get("kubernetes", False)
    else:
        assert args.auth_users is None and not args.auth_kubernetes
        assert by_kind(rendered[1], "Secret") == []


def test_a_token_key_is_made_when_none_is_given() -> None:
    objects = render(sets={"registry.auth.enabled": "true", "registry.auth.usersSecret": "u"})
    (secret,) = by_kind(objects, "Secret")
    assert len(secret["data"]["token-key"]) >= 64
    volumes = {v["name"]: v for v in pod_spec(objects, "registry")["volumes"]}
    assert volumes["registry-token-key"]["secret"]["secretName"] == secret["metadata"]["name"]


def test_kubernetes_pull_authorisation_wires_operator_registry_and_rbac(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Service account tokens as pull passwords: the registry asks the API server
    (system:auth-delegator, nothing else), and the operator keeps each namespace's pull
    Secret, with rules for exactly those objects."""
    objects = render(sets={"registry.auth.enabled": "true", "registry.auth.kubernetes": "true"})
    args = serve_arguments(objects)
    assert args.auth_kubernetes and args.auth_users is None
    settings = operator_settings(objects, monkeypatch)
    assert settings.pull_secrets is True
    roles = {role["metadata"]["name"]: role for role in by_kind(objects, "ClusterRole")}
    assert roles[settings.puller_cluster_role]["rules"] == [
        {"apiGroups": ["niximage.dev"], "resources": ["niximages"], "verbs": ["get"]}
    ]
    registry_account = pod_spec(objects, "registry")["serviceAccountName"]
    bindings = {
        binding["roleRef"]["name"]: binding["subjects"]
        for binding in by_kind(objects, "ClusterRoleBinding")
    }
    assert bindings["system:auth-delegator"] == [
        {"kind": "ServiceAccount", "name": registry_account, "namespace": "niximage-system"}
    ]
    operator_rules = roles["niximage"]["rules"]
    named = {
        (rule["resources"][0], tuple(rule.get("resourceNames", ()))): rule["verbs"]
        for rule in operator_rules
    }
    assert named[("secrets", ("niximage-pull",))] == ["get", "update"]
    assert named[("serviceaccounts/token", ("niximage-puller",))] == ["create"]
    # Without it: none of these rights.
    plain = {role["metadata"]["name"]: role for role in by_kind(render(), "ClusterRole")}
    assert set(plain) == {"niximage"}
    resources = {r for rule in plain["niximage"]["rules"] for r in rule["resources"]}
    assert not resources & {"secrets", "serviceaccounts", "serviceaccounts/token", "rolebindings"}


def run_operator_command(objects: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """Run the operator container's command with /bin/sh here, with ``niximage`` a stub
    that prints its arguments and its package source, and the image's package-source file
    in a temporary place."""
    item = container(objects, "operator")
    source_file = tmp_path / "package-source"
    source_file.write_text(PINNED + "\n")
    stub = tmp_path / "bin" / "niximage"
    stub.parent.mkdir()
    stub.write_text(
        "#!/bin/sh\n"
        'printf \'{"argv": "%s", "source": "%s"}\' \\\n'
        '  "$*" "$NIXIMAGE_OPERATOR_DEFAULT_PACKAGE_SOURCE"\n'
    )
    stub.chmod(0o755)
    command = [
        part.replace("/opt/niximage/package-source", str(source_file))
        for part in [*item["command"], *item.get("args", [])]
    ]
    env = {e["name"]: e["value"] for e in item["env"]}
    env["PATH"] = f"{stub.parent}:/usr/bin:/bin"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_operator_starts_with_the_images_pinned_package_set(tmp_path: Path) -> None:
    objects = render(sets={"operator.extraArgs[0]": "--verbose"})
    started = run_operator_command(objects, tmp_path)
    assert started == {"argv": "operator --verbose", "source": PINNED}


def test_a_configured_package_source_is_used_as_given(tmp_path: Path) -> None:
    source = "nixpkgs:0b73e36b1962620a8ac551a37229dd8662dac5c8"
    objects = render(sets={"packageSource.default": source})
    assert container(objects, "operator")["command"] == ["niximage", "operator"]
    started = run_operator_command(objects, tmp_path)
    assert started == {"argv": "operator", "source": source}


# ---- storage and identities ---------------------------------------------------------------


def annotations(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("annotations") or {})


def test_gcs_with_workload_identity_annotates_every_service_account() -> None:
    objects = render((CHART / "ci" / "gcs-workload-identity-values.yaml",))
    accounts = by_kind(objects, "ServiceAccount")
    assert {sa["metadata"]["namespace"] for sa in accounts} == {
        "niximage-system",
        "team-a",
        "team-b",
    }
    registry_account = pod_spec(objects, "registry")["serviceAccountName"]
    for sa in accounts:
        # The registry's own Google service account only reads the bucket.
        reader = sa["metadata"]["name"] == registry_account
        assert annotations(sa)["iam.gke.io/gcp-service-account"] == (
            "niximage-registry@example-project.iam.gserviceaccount.com"
            if reader
            else "niximage@example-project.iam.gserviceaccount.com"
        )
    assert by_kind(objects, "PersistentVolumeClaim") == []
    assert operator_environment(objects)[f"{ENV_PREFIX}STORAGE"] == (
        "gs://example-niximage/images/prod"
    )


def test_gcs_with_a_key_mounts_it_for_both_components() -> None:
    objects = render((CHART / "ci" / "gcs-key-values.yaml",))
    for name in COMPONENTS:
        item = container(objects, name)
        env = {e["name"]: e["value"] for e in item.get("env", [])}
        path = env["GOOGLE_APPLICATION_CREDENTIALS"]
        mounts = {m["mountPath"]: m for m in item["volumeMounts"]}
        assert mounts[str(Path(path).parent)]["readOnly"] is True
        secret = next(v["secret"] for v in pod_spec(objects, name)["volumes"] if "secret" in v)
        assert secret["secretName"] == "niximage-gcs-key"
    # The registry's own read-only key, when given.
    own = render(
        (CHART / "ci" / "gcs-key-values.yaml",),
        sets={"storage.gcs.registryKeySecret.name": "niximage-gcs-reader"},
    )
    secrets = [v["secret"] for v in pod_spec(own, "registry")["volumes"] if "secret" in v]
    assert [s["secretName"] for s in secrets] == ["niximage-gcs-reader"]
    # Builder pods then use their namespace's default service account.
    assert f"{ENV_PREFIX}BUILDER_SERVICE_ACCOUNT" not in operator_environment(objects)


def test_the_registry_gets_its_extra_environment() -> None:
    objects = render((CHART / "ci" / "gcs-key-values.yaml",))
    env = {e["name"]: e["value"] for e in container(objects, "registry")["env"]}
    assert env["NIXIMAGE_GCS_RETRY_DEADLINE"] == "60"
    assert env["GOOGLE_APPLICATION_CREDENTIALS"].endswith("/key.json")


def test_filesystem_storage_claim_is_kept_on_uninstall() -> None:
    objects = render()
    (claim,) = by_kind(objects, "PersistentVolumeClaim")
    assert annotations(claim)["helm.sh/resource-policy"] == "keep"
    existing = render(sets={"storage.filesystem.existingClaim": "images"})
    assert by_kind(existing, "PersistentVolumeClaim") == []
    volumes = pod_spec(existing)["volumes"]
    assert {"name": "storage", "persistentVolumeClaim": {"claimName": "images"}} in volumes


def test_the_registry_host_defaults_to_the_services_name() -> None:
    env = operator_environment(render(namespace="tools"))
    assert env[f"{ENV_PREFIX}REGISTRY"] == "niximage.tools.svc.cluster.local:5000"
    env = operator_environment(render(sets={"registry.host": "images.example.com"}))
    assert env[f"{ENV_PREFIX}REGISTRY"] == "images.example.com"


# ---- values.schema.json -----------------------------------------------------------------------


def test_the_values_schema_is_valid_and_accepts_the_value_sets() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = load_values(CHART / "values.yaml")
    jsonschema.Draft7Validator(schema).validate(defaults)


BAD_VALUES = [
    # (--set values, what the message must name)
    ({"storage.type": "s3"}, "at '/storage/type'"),
    ({"storage.type": "gcs"}, "at '/storage/gcs/bucket'"),
    ({"storage.type": "gcs", "storage.gcs.bucket": "gs://images"}, "at '/storage/gcs/bucket'"),
    ({"registry.host": "http://images.example.com"}, "at '/registry/host'"),
    ({"registry.service.type": "ExternalName"}, "at '/registry/service/type'"),
    ({"registry.auth.enabled": "true"}, "at '/registry/auth/usersSecret'"),
    ({"registry.auth.kubernetes": "true"}, "at '/registry/auth/enabled'"),
    ({"registry.replicas": "0"}, "at '/registry/replicas'"),
    ({"registry.podDisruptionBudget.maxUnavailable": "-1"}, "at '/registry/podDisruptionBudget"),
    ({"operator.maxConcurrentBuilds": "0"}, "at '/operator/maxConcurrentBuilds'"),
    ({"operator.watchNamespaces[0]": "Team_A"}, "at '/operator/watchNamespaces/0'"),
    ({"packageSource.default": "path:/opt/niximage/nix/testpkgs"}, "at '/packageSource/default'"),
    ({"image.digest": "sha256:1234"}, "at '/image/digest'"),
    ({"image.pullPolicy": "Sometimes"}, "at '/image/pullPolicy'"),
    ({"builder.resources.requests.memory": "lots"}, "at '/builder/resources/requests/memory'"),
    ({"replicaCount": "2"}, "'replicaCount'"),
    ({"gc.interval": "daily"}, "at '/gc/interval'"),
    ({"operator.metricsPort": "70000"}, "at '/operator/metricsPort'"),
    ({"builder.extraVolumes[0].name": "storage"}, "at '/builder/extraVolumes/0"),
    ({"builder.extraVolumeMounts[0].name": "x"}, "at '/builder/extraVolumeMounts/0'"),
    (
        {"builder.binaryCaches.substituters[0]": "ftp://cache"},
        "at '/builder/binaryCaches/substituters/0'",
    ),
    (
        {"builder.binaryCaches.substituters[0]": "https://cache"},
        "at '/builder/binaryCaches/trustedPublicKeys'",
    ),
    (
        {"builder.binaryCaches.trustedPublicKeys[0]": "cache:short"},
        "at '/builder/binaryCaches/trustedPublicKeys/0'",
    ),
]


@pytest.mark.parametrize(("sets", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_bad_values_are_refused_naming_the_value(sets: dict[str, str], message: str) -> None:
    proc = helm(*template_args(sets=sets), check=False)
    assert proc.returncode != 0, f"helm template accepted {sets}"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_lint_refuses_bad_values_too() -> None:
    proc = helm("lint", "--strict", str(CHART), "--set", "storage.type=s3", check=False)
    assert proc.returncode != 0
    assert "at '/storage/type'" in proc.stdout + proc.stderr


# ---- NOTES.txt ----------------------------------------------------------------------------------


def test_notes_show_how_to_apply_a_first_niximage_and_pull_it() -> None:
    text = notes(namespace="tools")
    manifest = text[text.index("apiVersion:") : text.index("YAML\n", text.index("apiVersion:"))]
    first = yaml.safe_load("\n".join(line[2:] for line in manifest.splitlines()))
    assert first["kind"] == "NixImage" and first["spec"]["packages"] == ["bash", "jq"]
    assert "kubectl apply -n tools -f -" in text
    assert "kubectl wait -n tools --for=condition=Ready nimg/jq" in text
    assert "kubectl port-forward -n tools svc/niximage 5000:5000" in text
    assert "podman run --rm --tls-verify=false 127.0.0.1:5000/tools/jq:1.0 jq --version" in text
    assert "niximage.tools.svc.cluster.local:5000/tools/jq:1.0" in text
    assert "Filesystem storage" in text  # the builder-pod limitation is spelled out


def test_notes_follow_the_values() -> None:
    text = notes((CHART / "ci" / "gcs-workload-identity-values.yaml",))
    assert "podman login --tls-verify=false 127.0.0.1:5000" in text
    assert "images.example.com/niximage-system/jq:1.0" in text
    assert "Filesystem storage" not in text
    namespaced = notes((CHART / "ci" / "namespaced-filesystem-values.yaml",))
    assert "The operator watches only: team-a, team-b." in namespaced
    assert "kubectl apply -n team-a -f -" in namespaced
    assert "bound to a PersistentVolume of its own on the same shared files" in namespaced
    assert "Garbage collection runs in the operator every 12h (grace 2h)" in namespaced
    assert "Garbage collection is off" in text
