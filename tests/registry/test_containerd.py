"""containerd, the kubelet's own puller, against ``niximage serve``.

The kubelet pulls through containerd's CRI image service; these tests make the same calls
(tests/registry/cri.py) to a real containerd 1.6 from Debian, started here with its own
directories and socket, then run the image with ``ctr run`` (runc). The registry is
reached at this machine's non-loopback address, which containerd would only try over
HTTPS, so the plain-HTTP pulls go through the ``hosts.toml`` recipe of
docs/kubelet-containerd.md. A pull secret travels as the CRI ``AuthConfig``, as the
kubelet sends it. docs/kubelet-containerd.md has what containerd asks of a registry.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.registry.containerd_node import Containerd, running_containerd
from tests.registry.cri import Cri
from tests.registry.support import RegistryProcess
from testsupport import niximage_json, require

pytestmark = [pytest.mark.clients, pytest.mark.nix, pytest.mark.root]


def node_address() -> str:
    """This machine's address on its network: not loopback, so containerd's defaults would
    use HTTPS for it (as for any registry a real node pulls from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))  # UDP: picks a route, sends nothing
            address = str(probe.getsockname()[0])
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address to reach the registry at")
    return address


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with running_containerd(tmp_path_factory.mktemp("containerd")) as node:
        yield node


@dataclass(frozen=True)
class Served:
    host: str
    """``address:port`` of the registry as nodes reach it."""
    oci: dict[str, str]
    docker: dict[str, str]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, str]]:
    require("nix-build")
    path = tmp_path_factory.mktemp("containerd-store") / "store"
    oci = niximage_json("build", "bash", "jq", "--storage", str(path), "--tag", "team/jq:1")
    docker = niximage_json(
        "build", "bash", "jq", "--format", "docker",
        "--storage", str(path), "--tag", "team/jq:docker",
    )  # fmt: skip
    return path, oci, docker


@contextlib.contextmanager
def serving(store: Path, *args: str) -> Iterator[str]:
    """``niximage serve`` on every interface; yields ``address:port`` as nodes reach it."""
    with RegistryProcess(store, "--listen", "0.0.0.0:0", *args) as registry:
        yield f"{node_address()}:{registry.address.rsplit(':', 1)[1]}"


@pytest.fixture(scope="module")
def served(store: tuple[Path, dict[str, str], dict[str, str]]) -> Iterator[Served]:
    path, oci, docker = store
    with serving(path) as host:
        yield Served(host, oci, docker)


@pytest.fixture
def cri(containerd: Containerd) -> Iterator[Cri]:
    client = Cri(containerd.socket)
    yield client
    client.close()


@pytest.mark.parametrize("kind", ["oci", "docker"])
def test_the_kubelet_path_pulls_by_tag_and_by_digest(
    containerd: Containerd, cri: Cri, served: Served, kind: str
) -> None:
    containerd.trust_plain_http(served.host)
    built = served.oci if kind == "oci" else served.docker
    tag = "1" if kind == "oci" else "docker"
    by_tag = f"{served.host}/team/jq:{tag}"
    image_id = cri.pull(by_tag)
    assert image_id == built["configDigest"]  # the image id is the config's digest
    status = cri.status(by_tag)
    assert status is not None
    assert f"{served.host}/team/jq@{built['manifestDigest']}" in status.repo_digests
    assert by_tag in status.repo_tags
    # A pod spec pinned to status.imageDigest pulls the very same image.
    assert cri.pull(f"{served.host}/team/jq@{built['manifestDigest']}") == image_id
    cri.remove(by_tag)


def test_without_hosts_toml_the_node_would_use_https(
    containerd: Containerd, cri: Cri, served: Served, tmp_path: Path
) -> None:
    """Why nodes need the hosts.toml entry: a plain-HTTP registry at a node address."""
    shutil.rmtree(containerd.certs / served.host, ignore_errors=True)
    with pytest.raises(grpc.RpcError) as refused:
        cri.pull(f"{served.host}/team/jq:1")
    assert "https://" in str(refused.value.details())


def test_an_unknown_tag_is_not_found(containerd: Containerd, cri: Cri, served: Served) -> None:
    containerd.trust_plain_http(served.host)
    with pytest.raises(grpc.RpcError) as missing:
        cri.pull(f"{served.host}/team/jq:nope")
    assert "not found" in str(missing.value.details())


def test_containerd_runs_the_image(containerd: Containerd, cri: Cri, served: Served) -> None:
    containerd.trust_plain_http(served.host)
    reference = f"{served.host}/team/jq:1"
    cri.pull(reference)
    done = containerd.run(reference, "jq", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "jq-1.6"
    # bash's builtins only (the image has bash and jq); /tmp is writable.
    done = containerd.run(
        reference, "bash", "-c", "echo $((6 * 7)) > /tmp/x; read -r v < /tmp/x; echo $v"
    )
    assert (done.returncode, done.stdout.strip()) == (0, "42"), done.stderr


def test_a_pull_secret_reaches_a_registry_with_authentication(
    containerd: Containerd,
    cri: Cri,
    store: tuple[Path, dict[str, str], dict[str, str]],
    tmp_path: Path,
) -> None:
    """registry.auth on: the kubelet's pull secret (CRI AuthConfig) is what lets it in."""
    users = tmp_path / "users"
    users.write_text("alice:s3cret\n")
    with serving(store[0], "--auth-users", str(users)) as host:
        containerd.trust_plain_http(host)
        reference = f"{host}/team/jq:1"
        with pytest.raises(grpc.RpcError) as denied:
            cri.pull(reference)
        assert "401 Unauthorized" in str(denied.value.details())
        with pytest.raises(grpc.RpcError):
            cri.pull(reference, username="alice", password="wrong")
        assert cri.pull(reference, username="alice", password="s3cret") == store[1]["configDigest"]
