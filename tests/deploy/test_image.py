"""The container image the chart runs, built for real (scripts/build-image.sh) and used the
way the cluster uses it.

- ``niximage --version`` answers, as the unprivileged user, without a compiler or pip.
- A builder pod: the exact command the operator gives builder pods (``podspec``), with an
  empty directory on /nix as the pod's emptyDir and no network, builds the bundled offline
  package set. The build key the builder reports equals the one the operator computes
  from the image's recorded package source, so operator and builder agree.
- The registry, as the chart starts it (read-only root, every capability dropped, storage
  mounted read-only), serves that image's manifest by tag.
- A builder pod with an empty /nix and a binary cache (a first pod's store, copied, signed
  and served over HTTP) builds the same image from narinfo and NARs alone.

Slow (debootstrap and podman build: minutes from scratch, about one minute warm) and root
only: marked ``image``. The debootstrap base and podman's layer cache persist in
``$NIXIMAGE_IMAGE_CACHE`` (default /var/cache/niximage-base) between runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import niximage_cli as cli
from kubesupport.helmtool import ROOT, render
from niximage_core import __version__, layout
from niximage_core.storage import factory
from niximage_operator import podspec, specs
from niximage_operator.settings import OperatorSettings

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

USER = "65532:65532"
"""The image's user, the chart's runAsUser."""


@dataclass(frozen=True)
class Built:
    image: str
    env: dict[str, str]
    """The environment that points podman at build-image.sh's own storage."""
    seconds: float

    def podman(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``podman run`` of the image without network, as its own (non-root) user."""
        return self.podman("run", "--rm", "--network=none", *args, timeout=timeout)


@pytest.fixture(scope="module")
def built() -> Built:
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, podman's vfs storage)")
    missing = [tool for tool in ("debootstrap", "podman", "runc") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)})")
    started = time.monotonic()
    done = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh")],
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert done.returncode == 0, f"build-image.sh failed:\n{done.stderr[-4000:]}"
    image = done.stdout.strip()
    assert image == f"localhost/niximage:{__version__}"
    cache = Path(os.environ.get("NIXIMAGE_IMAGE_CACHE", "/var/cache/niximage-base"))
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(cache / "podman" / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(cache / "podman" / "storage.conf"),
    }
    return Built(image, env, time.monotonic() - started)


def test_version_as_the_unprivileged_user(built: Built) -> None:
    done = built.run(built.image, "niximage", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"niximage {__version__}"
    user = built.podman("image", "inspect", "--format", "{{.Config.User}}", built.image)
    assert user.stdout.strip() == USER


def test_the_image_is_small_and_holds_no_build_tools(built: Built) -> None:
    size = int(built.podman("image", "inspect", "--format", "{{.Size}}", built.image).stdout)
    print(f"\nimage {built.image}: {size / 1e6:.0f} MB, built in {built.seconds:.0f} s")
    assert size < 420e6, f"the image grew to {size / 1e6:.0f} MB"
    script = (
        "for tool in gcc cc make pip pip3; do command -v $tool; done;"
        "find /var/lib/apt/lists /usr/share/man /usr/share/info -mindepth 1 | head -3;"
        "find /usr/share/doc -type f ! -name copyright | head -3"
    )
    done = built.run(built.image, "sh", "-c", script)
    assert done.stdout.split() == [], f"left in the image: {done.stdout}"
    # dpkg's file lists stay: the offline package set is made from them.
    done = built.run(built.image, "test", "-s", "/var/lib/dpkg/info/jq.list")
    assert done.returncode == 0


def deployment(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    """The chart's operator or registry Deployment."""
    (found,) = [
        o
        for o in objects
        if o["kind"] == "Deployment"
        and o["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return found


def operator_settings(built: Built, storage: str) -> OperatorSettings:
    """Settings as the chart gives them, with the package source the image recorded."""
    recorded = built.run(built.image, "cat", "/opt/niximage/package-source")
    assert recorded.returncode == 0, recorded.stderr
    return OperatorSettings(
        storage=storage,
        registry="registry.test:5000",
        builder_image=built.image,
        default_package_source=recorded.stdout.strip(),
    )


def test_the_recorded_package_source_is_the_repositorys_set(built: Built) -> None:
    """The image's pin is the NAR hash of the same files as this checkout's nix/testpkgs."""
    if shutil.which("nix") is None:
        pytest.skip("needs Nix on the host")
    local = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "hash", "path",
         "--type", "sha256", "--sri", str(ROOT / "nix" / "testpkgs")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    settings = operator_settings(built, "/var/lib/niximage")
    assert settings.default_package_source == f"path:/opt/niximage/nix/testpkgs#{local}"


def builder_pod_run(
    built: Built,
    tmp_path: Path,
    packages: list[str],
    caches: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the builder container the operator would create, as a pod would run it; with
    ``caches`` (operator settings for binary caches) on the host's network, else none.
    The pod's /nix is ``tmp_path/nix``."""
    storage, nix_store, log = tmp_path / "storage", tmp_path / "nix", tmp_path / "termination"
    storage.mkdir(parents=True)
    nix_store.mkdir()
    nix_store.chmod(0o777)  # what an emptyDir is
    log.touch()
    for path in (storage, log):
        os.chown(path, 65532, 65532)
    settings = operator_settings(built, "/var/lib/niximage")
    if caches:
        settings = settings.model_copy(update=caches)
    body = {
        "apiVersion": podspec.API_VERSION,
        "kind": podspec.KIND,
        "metadata": {"name": "jq", "namespace": "demo", "uid": "u1", "generation": 1},
        "spec": {"packages": packages},
    }
    sources = specs.PackageSources.configure(settings.default_package_source)
    target = specs.resolve(body, sources)
    pod = podspec.builder_pod(target, 1, body, settings)
    container = pod["spec"]["containers"][0]
    env = [f"--env={e['name']}={e['value']}" for e in container["env"]]
    done = built.podman(
        "run",
        "--rm",
        "--network=host" if caches else "--network=none",
        # What Pod Security's "restricted" level leaves a pod: no capabilities, no
        # privilege escalation, not root.
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        f"--user={USER}",
        f"--volume={storage}:/var/lib/niximage",
        f"--volume={nix_store}:{settings.nix_store_mount_path}",
        f"--volume={log}:{container['terminationMessagePath']}",
        # No binary cache here (and none needed: the set is made of the image's files).
        "--env=NIX_CONFIG=substituters =",
        *env,
        built.image,
        *container["command"],
        timeout=1200,
    )
    assert done.returncode == 0, f"the builder failed:\n{done.stderr[-4000:]}"
    return {
        "target": target,
        "result": json.loads(done.stdout),
        "termination": log.read_text(),
        "storage": storage,
    }


def test_a_builder_pod_builds_the_bundled_set_and_the_registry_serves_it(
    built: Built, tmp_path: Path
) -> None:
    run = builder_pod_run(built, tmp_path, ["jq", "bash"])
    target, result = run["target"], run["result"]
    assert result["buildKey"] == target.key  # operator and builder agree on the key
    assert result["manifestDigest"].startswith("sha256:")
    assert target.key in run["termination"]

    # The operator's part, done here: record the tag, as it does on success.
    storage = factory.open_storage(str(run["storage"]))
    stored = layout.cached_result(storage, target.key)
    assert stored is not None
    layout.record_tag(storage, target.repository, target.tag, stored)
    storage.close()
    subprocess.run(["chmod", "-R", "a+rX", str(run["storage"])], check=True)

    # The registry, as the chart runs it, fetching the manifest from inside its container.
    (registry,) = deployment(render(), "registry")["spec"]["template"]["spec"]["containers"]
    serve = cli.build_parser().parse_args(registry["command"][1:])
    port = serve.listen.rpartition(":")[2]
    url = f"http://127.0.0.1:{port}/v2/{target.repository}/manifests/{target.tag}"
    probe = (
        "import subprocess, sys, time, urllib.request\n"
        "server = subprocess.Popen(sys.argv[1:])\n"
        "for _ in range(200):\n"
        "    try:\n"
        f"        urllib.request.urlopen('http://127.0.0.1:{port}/healthz'); break\n"
        "    except OSError:\n"
        "        time.sleep(0.05)\n"
        f"request = urllib.request.Request({url!r}, method='HEAD', headers={{'Accept': '*/*'}})\n"
        "digest = urllib.request.urlopen(request).headers['Docker-Content-Digest']\n"
        "print('digest', digest, flush=True)\n"
        "server.terminate(); server.wait()\n"
    )
    done = built.run(
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        f"--user={USER}",
        "--tmpfs=/tmp",
        f"--volume={run['storage']}:{serve.storage}:ro",
        built.image,
        "python3",
        "-c",
        probe,
        *registry["command"],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # (The registry's JSON access log shares stdout.)
    assert f"digest {result['manifestDigest']}" in done.stdout.splitlines()


def test_a_builder_pod_with_an_empty_store_builds_from_a_binary_cache(
    built: Built, tmp_path: Path
) -> None:
    """Issue 15 in the image: a builder pod's store is made a signed cache and served over
    HTTP; a second pod, its /nix empty, given the cache as the operator gives it
    (``--substituter``, ``--trusted-public-key``), builds the same images from narinfo and
    NARs alone: the same manifest digests, no derivation built."""
    from tests.binarycache.cachesupport import Key, closure_paths, copy_to_cache, serve

    packages = ["jq", "python3"]
    warm = builder_pod_run(built, tmp_path / "warm", packages)["result"]
    key = Key(tmp_path)
    paths = sorted(closure_paths(warm))
    copy_to_cache(tmp_path / "cache", paths, "zstd", key, f"local?root={tmp_path / 'warm'}")
    with serve(tmp_path / "cache") as server:
        caches = {"substituters": [server.url], "trusted_public_keys": [key.public]}
        cold = builder_pod_run(built, tmp_path / "cold", packages, caches)["result"]
        served = server.served_nar_bytes()
    assert cold["manifestDigest"] == warm["manifestDigest"]
    assert cold["derivationsBuilt"] == 0
    assert cold["narsDownloaded"] == len(paths) and cold["bytesDownloaded"] == served
    # Nothing was substituted into the pod's store: only the package set's sources are in it.
    in_store = {p.name for p in (tmp_path / "cold" / "nix" / "store").iterdir()}
    assert not in_store & {p.rpartition("/")[2] for p in paths}


def test_the_operator_entry_imports_in_the_image(built: Built) -> None:
    done = built.run(built.image, "python3", "-m", "niximage_operator", "--help")
    assert done.returncode == 0, done.stderr
    assert "--builder-image" in done.stdout


def test_the_charts_operator_command_starts_in_the_image(built: Built) -> None:
    """The chart's command (the shell reading the image's package source, then
    ``niximage operator``) gets as far as argument parsing in the image."""
    (operator,) = deployment(render(), "operator")["spec"]["template"]["spec"]["containers"]
    done = built.run(
        "--read-only", f"--user={USER}", "--tmpfs=/tmp", built.image, *operator["command"], "--help"
    )
    if "invalid choice: 'operator'" in done.stderr:
        pytest.skip("`niximage operator` is not wired into the CLI yet")
    assert done.returncode == 0, done.stderr
    assert "--builder-image" in done.stdout
