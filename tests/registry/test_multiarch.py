"""One tag, two platforms: an image index of amd64 and arm64 images, built here for real.

The arm64 image is made of Debian's arm64 binaries (nix/testpkgs with ``system =
"aarch64-linux"``), built by Nix through qemu-user's binfmt_misc handler, and run through
it too; scripts/install-arm64.sh sets that up, and without it every test here skips saying
what is missing. Real clients pull the index from ``niximage serve`` by its tag: podman
runs each platform's image, skopeo shows the index and the arm64 config, containerd's CRI
pull (the kubelet's call) resolves the amd64 image and ``ctr run`` runs it, and ``niximage
export`` writes an OCI layout skopeo reads.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from niximage_core import manifest
from tests.registry.containerd_node import Containerd, running_containerd
from tests.registry.cri import Cri
from tests.registry.support import RegistryProcess
from tests.registry.test_containerd import node_address
from testsupport import niximage_json, podman, podman_env, require, require_arm64, require_root

pytestmark = [pytest.mark.clients, pytest.mark.nix, pytest.mark.root]

TAG = "team/jq:multi"
PACKAGES = ("jq", "busybox")


@dataclass(frozen=True)
class Built:
    storage: Path
    index: dict[str, Any]
    amd64_alone: dict[str, Any]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require("nix-build")
    require_arm64()
    storage = tmp_path_factory.mktemp("multiarch") / "store"
    index = niximage_json(
        "build", *PACKAGES, "--arch", "amd64,arm64", "--storage", str(storage), "--tag", TAG
    )
    amd64_alone = niximage_json("build", *PACKAGES, "--storage", str(storage))
    return Built(storage, index, amd64_alone)


@pytest.fixture(scope="module")
def registry(built: Built) -> Iterator[str]:
    with RegistryProcess(built.storage, "--listen", "0.0.0.0:0") as served:
        yield served.address


def platform_digest(built: Built, arch: str) -> str:
    (platform,) = [p for p in built.index["platforms"] if p["architecture"] == arch]
    return str(platform["manifestDigest"])


def test_the_index_names_one_image_per_platform(built: Built) -> None:
    assert built.index["mediaType"] == manifest.OCI_INDEX
    assert [p["architecture"] for p in built.index["platforms"]] == ["amd64", "arm64"]
    # Each platform is its own build: the amd64 image alone is the index's amd64 image.
    assert built.amd64_alone["cached"] is True
    assert built.amd64_alone["manifestDigest"] == platform_digest(built, "amd64")
    # Architecture-independent store paths (certificates, /etc files) are one layer, the
    # same blob in both images.
    amd64, arm64 = (set(p["layers"]) for p in built.index["platforms"])
    assert amd64 & arm64


def test_podman_runs_each_platform_by_the_same_tag(
    built: Built, registry: str, tmp_path: Path
) -> None:
    environment = podman_env(tmp_path / "podman")
    image = f"{registry}/{TAG}"
    for platform, machine in (("linux/arm64", "aarch64"), ("linux/amd64", "x86_64")):
        out = podman(
            environment, "run", "--rm", "--network=none", "--tls-verify=false",
            "--platform", platform, image, "sh", "-c", "uname -m; jq --version",
        )  # fmt: skip
        assert out.splitlines() == [machine, "jq-1.6"], (platform, out)


def skopeo(*args: str) -> str:
    require("skopeo")
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_skopeo_shows_the_index_and_the_arm64_config(built: Built, registry: str) -> None:
    image = f"docker://{registry}/{TAG}"
    index = json.loads(skopeo("inspect", "--tls-verify=false", "--raw", image))
    assert index["mediaType"] == manifest.OCI_INDEX
    assert {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]} == {
        "amd64": platform_digest(built, "amd64"),
        "arm64": platform_digest(built, "arm64"),
    }
    config = json.loads(
        skopeo("--override-arch", "arm64", "inspect", "--tls-verify=false", "--config", image)
    )
    assert (config["architecture"], config["os"]) == ("arm64", "linux")


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    require_root()
    with running_containerd(tmp_path_factory.mktemp("containerd")) as node:
        yield node


def test_containerd_resolves_the_amd64_image_and_runs_it(
    built: Built, registry: str, containerd: Containerd
) -> None:
    host = f"{node_address()}:{registry.rsplit(':', 1)[1]}"
    containerd.trust_plain_http(host)
    cri = Cri(containerd.socket)
    try:
        reference = f"{host}/{TAG}"
        (amd64,) = [p for p in built.index["platforms"] if p["architecture"] == "amd64"]
        assert cri.pull(reference) == amd64["configDigest"]
        done = containerd.run(reference, "uname", "-m")
        assert (done.returncode, done.stdout.strip()) == (0, "x86_64"), done.stderr
    finally:
        cri.close()


def test_export_writes_the_index_with_both_images(built: Built, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    exported = niximage_json("export", TAG, str(layout), "--storage", str(built.storage))
    assert exported["digest"] == built.index["manifestDigest"]
    for arch in ("amd64", "arm64"):
        config = json.loads(
            skopeo("--override-arch", arch, "inspect", "--config", f"oci:{layout}:multi")
        )
        assert config["architecture"] == arch


def test_on_demand_multiarch_names_serve_an_index(tmp_path: Path) -> None:
    """Nixery's names, one meta-package further: ``multiarch/…`` is built on the first
    pull as an index of amd64 and arm64; ``arm64/…`` stays one arm64 image."""
    require_arm64()
    with RegistryProcess(tmp_path / "store", "--on-demand") as served:
        index = json.loads(
            skopeo("inspect", "--tls-verify=false", "--raw",
                   f"docker://{served.address}/multiarch/busybox:latest")
        )  # fmt: skip
        assert index["mediaType"] == manifest.OCI_INDEX
        assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
        config = json.loads(
            skopeo("--override-arch", "arm64", "inspect", "--tls-verify=false", "--config",
                   f"docker://{served.address}/multiarch/busybox:latest")
        )  # fmt: skip
        assert config["architecture"] == "arm64"
        single = json.loads(
            skopeo("inspect", "--tls-verify=false", "--raw",
                   f"docker://{served.address}/arm64/busybox:latest")
        )  # fmt: skip
        assert single["mediaType"] == manifest.OCI_MANIFEST
        # The arm64 image alone is the index's arm64 entry: one build, cached once.
        assert single == json.loads(
            skopeo("inspect", "--tls-verify=false", "--raw",
                   f"docker://{served.address}/multiarch/busybox@{index['manifests'][1]['digest']}")
        )  # fmt: skip


def test_format_docker_makes_a_manifest_list(built: Built, registry: str) -> None:
    listed = niximage_json(
        "build", *PACKAGES, "--arch", "amd64,arm64", "--format", "docker",
        "--storage", str(built.storage), "--tag", "team/jq:docker",
    )  # fmt: skip
    assert listed["mediaType"] == manifest.DOCKER_LIST
    raw = json.loads(
        skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{registry}/team/jq:docker")
    )
    assert raw["mediaType"] == manifest.DOCKER_LIST
    assert {m["mediaType"] for m in raw["manifests"]} == {manifest.DOCKER_MANIFEST}
    assert [m["platform"].get("variant") for m in raw["manifests"]] == [None, "v8"]
