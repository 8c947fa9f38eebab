"""podspec: the builder pod manifest, a pure function of the target and the settings."""

from __future__ import annotations

from kubernetes import client
from operator_samples import UID, body, settings, target

from niximage_operator import podspec


def test_the_name_comes_from_the_key_and_attempt() -> None:
    key = target().key
    assert podspec.pod_name(key, 1) == f"niximage-build-{key[:20]}-1"
    assert podspec.pod_name(key, 2) != podspec.pod_name(key, 1)
    assert len(podspec.pod_name(key, 99)) <= 63


def test_the_pod_runs_niximage_build_once_with_the_termination_log() -> None:
    resolved = target(packages=("jq", "bash"), arch="arm64")
    pod = podspec.builder_pod(resolved, 3, body(), settings(build_timeout=900))
    spec = pod["spec"]
    [container] = spec["containers"]
    assert spec["restartPolicy"] == "Never"
    assert container["image"] == "ghcr.io/example/niximage:1"
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["command"][:2] == ["niximage", "build"]
    command = container["command"]
    assert command[2:6] == ["bash", "cacert", "iana-etc", "jq"]
    flags = dict(zip(command[6::2], command[7::2], strict=True))
    assert flags == {
        "--package-source": str(resolved.spec.source),
        "--arch": "arm64",
        "--format": "oci",
        "--compression": "gzip",
        "--storage": "gs://niximage-test",
        "--timeout": "900",
        "--termination-log": "/dev/termination-log",
    }
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "arm64", "kubernetes.io/os": "linux"}
    assert spec["activeDeadlineSeconds"] == 900 + podspec.DEADLINE_MARGIN
    assert spec["automountServiceAccountToken"] is False
    assert container["resources"] == settings().builder_resources
    assert {"name": "NIXIMAGE_BUILD_KEY", "value": resolved.key} in container["env"]


def test_an_index_is_built_by_one_pod_on_the_multi_arch_builders_node() -> None:
    resolved = target(packages=("jq",), architectures=["amd64", "arm64"])
    assert resolved.architectures == ("amd64", "arm64")
    for node_arch in ("amd64", "arm64"):
        pod = podspec.builder_pod(resolved, 1, body(), settings(multi_arch_builder_arch=node_arch))
        [container] = pod["spec"]["containers"]
        command = container["command"]
        assert command[command.index("--arch") + 1] == "amd64,arm64"
        assert pod["spec"]["nodeSelector"]["kubernetes.io/arch"] == node_arch


def test_labels_annotations_and_owner() -> None:
    resolved = target()
    metadata = podspec.builder_pod(resolved, 2, body(), settings())["metadata"]
    assert metadata["namespace"] == "default"
    assert metadata["labels"] == {
        "app.kubernetes.io/managed-by": "niximage-operator",
        "app.kubernetes.io/component": "builder",
        "niximage.dev/build-key": resolved.key[:63],
        "niximage.dev/attempt": "2",
    }
    assert metadata["annotations"]["niximage.dev/build-key"] == resolved.key
    assert metadata["ownerReferences"] == [
        {
            "apiVersion": "niximage.dev/v1alpha1",
            "kind": "NixImage",
            "name": "jq",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": False,
        }
    ]
    assert podspec.owner_reference(body(), controller=False)["controller"] is False


def test_configured_store_volume_service_account_and_env() -> None:
    configured = settings(
        builder_service_account="builder",
        nix_store_volume={"persistentVolumeClaim": {"claimName": "nix"}},
        nix_store_mount_path="/nix",
        builder_env={"NIX_CONFIG": "max-jobs = 4"},
        builder_command=["/usr/bin/niximage"],
        builder_pull_policy="Always",
    )
    pod = podspec.builder_pod(target(), 1, body(), configured)
    spec = pod["spec"]
    [container] = spec["containers"]
    assert spec["serviceAccountName"] == "builder"
    assert spec["volumes"] == [{"name": "nix-store", "persistentVolumeClaim": {"claimName": "nix"}}]
    assert container["volumeMounts"] == [{"name": "nix-store", "mountPath": "/nix"}]
    assert {"name": "NIX_CONFIG", "value": "max-jobs = 4"} in container["env"]
    assert container["command"][0] == "/usr/bin/niximage"
    assert container["imagePullPolicy"] == "Always"


def test_without_a_store_volume_there_is_none() -> None:
    spec = podspec.builder_pod(target(), 1, body(), settings())["spec"]
    assert "volumes" not in spec and "volumeMounts" not in spec["containers"][0]
    assert "serviceAccountName" not in spec


STORAGE_VOLUME = {"name": "storage", "persistentVolumeClaim": {"claimName": "niximage"}}
STORAGE_MOUNT = {"name": "storage", "mountPath": "/var/lib/niximage"}


def test_storage_volumes_come_after_the_nix_store() -> None:
    configured = settings(
        nix_store_volume={"emptyDir": {}},
        builder_volumes=[STORAGE_VOLUME],
        builder_volume_mounts=[STORAGE_MOUNT],
    )
    spec = podspec.builder_pod(target(), 1, body(), configured)["spec"]
    assert spec["volumes"] == [{"name": "nix-store", "emptyDir": {}}, STORAGE_VOLUME]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": "nix-store", "mountPath": "/nix"},
        STORAGE_MOUNT,
    ]
    alone = settings(builder_volumes=[STORAGE_VOLUME], builder_volume_mounts=[STORAGE_MOUNT])
    spec = podspec.builder_pod(target(), 1, body(), alone)["spec"]
    assert spec["volumes"] == [STORAGE_VOLUME]


def test_scheduling_and_pull_secrets() -> None:
    configured = settings(
        builder_node_selector={"pool": "builds", "kubernetes.io/arch": "s390x"},
        builder_tolerations=[{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        builder_image_pull_secrets="registry-a, registry-b",
    )
    spec = podspec.builder_pod(target(arch="arm64"), 1, body(), configured)["spec"]
    assert spec["nodeSelector"] == {  # the NixImage's architecture wins
        "pool": "builds",
        "kubernetes.io/arch": "arm64",
        "kubernetes.io/os": "linux",
    }
    assert spec["tolerations"] == configured.builder_tolerations
    assert spec["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry-b"}]
    plain = podspec.builder_pod(target(), 1, body(), settings())["spec"]
    assert "tolerations" not in plain and "imagePullSecrets" not in plain


def test_the_pod_meets_the_restricted_pod_security_standard() -> None:
    """The checks of the "restricted" level (kubernetes.io/docs/concepts/security/
    pod-security-standards) that a pod spec can fail, for the pod and its container."""
    spec = podspec.builder_pod(target(), 1, body(), settings(builder_user=1234))["spec"]
    [container] = spec["containers"]
    pod_security, security = spec["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == pod_security["runAsGroup"] == 1234
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in security["capabilities"]
    assert not any(key in spec for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in volume for volume in spec.get("volumes", []))


def test_the_same_key_gives_the_same_pod_whoever_asks() -> None:
    one = podspec.builder_pod(target(name="a", packages=("jq",)), 1, body(name="a"), settings())
    two = podspec.builder_pod(target(name="b", packages=("jq",)), 1, body(name="b"), settings())
    assert one["spec"] == two["spec"]
    assert one["metadata"]["name"] == two["metadata"]["name"]


def test_the_manifest_is_a_pod_the_official_model_knows_field_by_field() -> None:
    """An offline schema check: the kubernetes client's typed V1Pod drops unknown fields
    and refuses wrong types, so a manifest that survives the round trip unchanged uses
    only real Pod fields with the right types."""
    configured = settings(
        builder_service_account="builder",
        nix_store_volume={"persistentVolumeClaim": {"claimName": "nix"}},
        builder_env={"NIX_CONFIG": "max-jobs = 4"},
        builder_volumes=[STORAGE_VOLUME],
        builder_volume_mounts=[STORAGE_MOUNT],
        builder_tolerations=[{"key": "dedicated", "operator": "Exists"}],
        builder_image_pull_secrets=["registry"],
    )
    manifest = podspec.builder_pod(target(arch="arm64"), 2, body(), configured)
    typed = client.V1Pod.from_dict(manifest)
    assert client.ApiClient().sanitize_for_serialization(typed) == manifest
