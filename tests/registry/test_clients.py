"""Real clients against ``niximage serve`` holding images built with the real pipeline.

skopeo (inspect --raw / --config, copy to an OCI layout), umoci (unpack, then a command in
a chroot), podman (pull and run with runc and lowered ulimits: the README's "Pulling with podman"),
for OCI and Docker schema-2 manifests, by tag and by digest. The same skopeo checks run
against Debian's docker-registry (distribution 2.8) holding the same images, as a
reference. On-demand mode: podman pulls an image nobody built yet, and twenty concurrent
first pulls run one build.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import testsupport
from niximage_core.digest import Digest
from tests.registry.support import RegistryProcess
from testsupport import niximage_json, podman, require, require_root, wait_http

pytestmark = [pytest.mark.clients, pytest.mark.nix]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NIX_CONFIG = (
    "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nsubstituters ="
)


@pytest.fixture(scope="module", autouse=True)
def nix_config() -> Iterator[None]:
    """Offline single-user Nix, unless /etc/nix/nix.conf says so already (install.sh)."""
    require("nix-build", "skopeo")
    conf = Path("/etc/nix/nix.conf")
    text = conf.read_text() if conf.exists() else ""
    if "substituters =" in text and "build-users-group =" in text:
        yield
        return
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NIX_CONFIG", NIX_CONFIG)
        yield


@dataclass(frozen=True)
class Built:
    store: Path
    oci: Digest
    docker: Digest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    store = tmp_path_factory.mktemp("clients") / "store"
    oci = niximage_json("build", "bash", "jq", "--storage", str(store), "--tag", "test/jq:latest")
    docker = niximage_json(
        "build",
        "bash",
        "jq",
        "--format",
        "docker",
        "--storage",
        str(store),
        "--tag",
        "test/jq:docker",
    )
    return Built(store, Digest.parse(oci["manifestDigest"]), Digest.parse(docker["manifestDigest"]))


@pytest.fixture(scope="module")
def ours(built: Built) -> Iterator[str]:
    with RegistryProcess(built.store) as registry:
        yield registry.address


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def reference(ours: str, built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """docker-registry 2.8 holding the same images (copied with their digests)."""
    require("docker-registry")
    work = tmp_path_factory.mktemp("docker-registry")
    address = f"127.0.0.1:{free_port()}"
    config = work / "config.yml"
    config.write_text(
        "version: 0.1\nlog: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {work / 'data'}}}}}\n"
        f"http: {{addr: {address}}}\n"
    )
    with open(work / "log", "wb") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=log
        )
    try:
        wait_http(f"http://{address}/v2/", timeout=20)
        for tag in ("latest", "docker"):
            skopeo(
                "copy",
                "--preserve-digests",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                f"docker://{ours}/test/jq:{tag}",
                f"docker://{address}/test/jq:{tag}",
            )
        yield address
    finally:
        process.terminate()
        process.wait(10)


def skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"skopeo {' '.join(args)}:\n{proc.stderr}"
    return proc.stdout


REFS = ["latest", "docker", "@oci", "@docker"]


def ref_of(address: str, ref: str, built: Built) -> str:
    if ref.startswith("@"):
        digest = built.oci if ref == "@oci" else built.docker
        return f"{address}/test/jq@{digest}"
    return f"{address}/test/jq:{ref}"


def expected_digest(ref: str, built: Built) -> Digest:
    return built.oci if ref in ("latest", "@oci") else built.docker


@pytest.mark.parametrize("which", ["ours", "docker-registry"])
@pytest.mark.parametrize("ref", REFS)
def test_skopeo_inspect(which: str, ref: str, built: Built, request: pytest.FixtureRequest) -> None:
    address = request.getfixturevalue("ours" if which == "ours" else "reference")
    image = f"docker://{ref_of(address, ref, built)}"
    raw = skopeo("inspect", "--tls-verify=false", "--raw", image).encode()
    assert Digest.of(raw) == expected_digest(ref, built)
    config = json.loads(skopeo("inspect", "--tls-verify=false", "--config", image))
    assert config["architecture"] == "amd64" and config["rootfs"]["diff_ids"]
    assert any(e.startswith("PATH=") for e in config["config"]["Env"])


@pytest.mark.parametrize("which", ["ours", "docker-registry"])
@pytest.mark.parametrize("ref", ["latest", "@docker"])
def test_skopeo_copy_and_umoci_unpack_and_run(
    which: str, ref: str, built: Built, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require("umoci", "chroot")
    require_root()
    address = request.getfixturevalue("ours" if which == "ours" else "reference")
    layout = tmp_path / "layout"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{ref_of(address, ref, built)}",
        f"oci:{layout}:img",
    )
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:img", str(bundle)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    proc = subprocess.run(
        [
            str(shutil.which("chroot")),
            str(bundle / "rootfs"),
            "/bin/sh",
            "-c",
            "jq --version && echo '{\"a\":1}' | jq .a",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/bin:/usr/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("jq-") and proc.stdout.strip().endswith("1")


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return testsupport.podman_env(tmp_path_factory.mktemp("podman"))


@pytest.mark.parametrize("ref", REFS)
def test_podman_pull_and_run(ref: str, ours: str, built: Built, podman_env: dict[str, str]) -> None:
    image = ref_of(ours, ref, built)
    podman(podman_env, "pull", "--tls-verify=false", image)
    out = podman(podman_env, "run", "--rm", "--network=none", image, "jq", "--version")
    assert out.startswith("jq-")


def test_on_demand_pull_builds_once_and_runs(tmp_path: Path, podman_env: dict[str, str]) -> None:
    with RegistryProcess(tmp_path / "store", "--on-demand", "--max-builds", "2") as registry:
        url = f"{registry.url}/v2/bash/jq/manifests/latest"
        request = urllib.request.Request(
            url, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
        )

        def pull(_: int) -> tuple[int, str]:
            with _OPENER.open(request, timeout=300) as response:
                response.read()
                return response.status, response.headers["Docker-Content-Digest"]

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(pull, range(20)))
        assert {status for status, _ in results} == {200}
        assert len({digest for _, digest in results}) == 1
        with _OPENER.open(f"{registry.url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'niximage_registry_builds_total{result="ok",worker="0"} 1.0' in metrics
        image = f"{registry.address}/bash/jq:latest"
        podman(podman_env, "pull", "--tls-verify=false", image)
        out = podman(podman_env, "run", "--rm", "--network=none", image, "jq", "--version")
        assert out.startswith("jq-")
        try:
            with _OPENER.open(f"{registry.url}/v2/jq/nosuchpackage/manifests/latest", timeout=300):
                raise AssertionError("expected 404")
        except urllib.error.HTTPError as error:
            assert error.code == 404
            assert "nosuchpackage" in json.loads(error.read())["errors"][0]["message"]
