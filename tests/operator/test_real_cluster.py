"""The emulator scenarios against a real cluster: runs only when ``KUBECONFIG`` is set.

The operator runs in this process (as in the emulator tests), watching one fresh
namespace; builder pods run on the cluster's nodes. Needed, besides ``KUBECONFIG``:

- the NixImage CRD may be missing (it is applied), but the kubeconfig's user must be
  allowed to create it, namespaces, pods and NixImages;
- ``NIXIMAGE_OPERATOR_STORAGE``: storage both this process and the builder pods reach
  (``gs://bucket/prefix``, or a path mounted at the same place everywhere);
- ``NIXIMAGE_OPERATOR_BUILDER_IMAGE``: an image with ``niximage`` and Nix that the nodes
  can pull, and ``NIXIMAGE_OPERATOR_DEFAULT_PACKAGE_SOURCE``: the pinned package set
  inside it (the offline set: ``path:<dir>#<nix hash path of it>``);
- ``NIXIMAGE_OPERATOR_REGISTRY`` (only written into statuses); optionally
  ``NIXIMAGE_OPERATOR_BUILDER_SERVICE_ACCOUNT`` and the other operator variables.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pykube
import pytest
import pytest_asyncio
import yaml
from operator_harness import CRD_PATH, RunningOperator, eventually

from niximage_builder import build
from niximage_builder.storage import factory
from niximage_operator import podspec
from niximage_operator.settings import OperatorSettings

NEEDED = (
    "NIXIMAGE_OPERATOR_STORAGE",
    "NIXIMAGE_OPERATOR_BUILDER_IMAGE",
    "NIXIMAGE_OPERATOR_DEFAULT_PACKAGE_SOURCE",
    "NIXIMAGE_OPERATOR_REGISTRY",
)
MISSING = [name for name in ("KUBECONFIG", *NEEDED) if not os.environ.get(name)]

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(bool(MISSING), reason=f"real-cluster suite: set {', '.join(MISSING)}"),
]

API = f"/apis/{podspec.API_VERSION}"
BUILD_TIMEOUT = float(os.environ.get("NIXIMAGE_TEST_BUILD_TIMEOUT", "600"))


class Cluster:
    """Just enough of a client: raw calls through pykube-ng, off the event loop."""

    def __init__(self, namespace: str) -> None:
        self.api = pykube.HTTPClient(pykube.KubeConfig.from_file(os.environ["KUBECONFIG"]))
        self.namespace = namespace

    async def call(self, method: str, **kwargs: Any) -> Any:
        response = await asyncio.to_thread(getattr(self.api, method), **kwargs)
        if response.status_code == 404:
            return None
        if not response.ok:
            raise AssertionError(f"{method} {kwargs.get('url')}: {response.text}")
        return response.json()

    async def apply(self, body: dict[str, Any]) -> None:
        path = f"namespaces/{self.namespace}/niximages"
        await self.call("post", version=podspec.API_VERSION, url=path, data=json.dumps(body))

    async def image(self, name: str) -> dict[str, Any]:
        path = f"namespaces/{self.namespace}/niximages/{name}"
        return await self.call("get", version=podspec.API_VERSION, url=path) or {}

    async def change_spec(self, name: str, spec: dict[str, Any]) -> None:
        await self.call(
            "patch",
            version=podspec.API_VERSION,
            url=f"namespaces/{self.namespace}/niximages/{name}",
            data=json.dumps({"spec": spec}),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def delete(self, name: str) -> None:
        path = f"namespaces/{self.namespace}/niximages/{name}"
        await self.call("delete", version=podspec.API_VERSION, url=path)

    async def builder_pods(self) -> list[dict[str, Any]]:
        found = await self.call(
            "get",
            version="v1",
            namespace=self.namespace,
            url="pods",
            params={"labelSelector": podspec.POD_SELECTOR},
        )
        return list((found or {}).get("items", []))


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    namespace = f"niximage-test-{uuid.uuid4().hex[:8]}"
    client = Cluster(namespace)
    crd = yaml.safe_load(CRD_PATH.read_text())
    crds = "customresourcedefinitions"
    existing = await client.call(
        "get", version="apiextensions.k8s.io/v1", url=f"{crds}/{crd['metadata']['name']}"
    )
    if existing is None:
        await client.call("post", version="apiextensions.k8s.io/v1", url=crds, data=json.dumps(crd))
        await asyncio.sleep(5)  # the new resource reaches discovery
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    await client.call("post", version="v1", url="namespaces", data=json.dumps(body))
    try:
        yield client
    finally:
        await client.call("delete", version="v1", url=f"namespaces/{namespace}")


@pytest_asyncio.fixture
async def operator(cluster: Cluster) -> AsyncIterator[RunningOperator]:
    # The rest comes from the NIXIMAGE_OPERATOR_* variables.
    settings = OperatorSettings(namespaces=[cluster.namespace])  # type: ignore[call-arg]
    running = RunningOperator(settings)
    await running.start()
    yield running
    await running.stop()


def nix_image(name: str, packages: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": podspec.API_VERSION,
        "kind": "NixImage",
        "metadata": {"name": name},
        "spec": {"packages": packages, **spec},
    }


async def reason(cluster: Cluster, name: str) -> str | None:
    for condition in (await cluster.image(name)).get("status", {}).get("conditions", ()):
        if condition["type"] == "Ready":
            return str(condition["reason"])
    return None


async def wait_reason(cluster: Cluster, name: str, wanted: str) -> dict[str, Any]:
    latest: dict[str, Any] = {}

    async def poll() -> bool:
        nonlocal latest
        latest = await cluster.image(name)
        return await reason(cluster, name) == wanted

    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUILD_TIMEOUT
    while not await poll():
        assert loop.time() < deadline, f"{name} never became {wanted}: {latest.get('status')}"
        await asyncio.sleep(1)
    return latest


def tag_of(repository: str, tag: str) -> str | None:
    storage = factory.open_storage(os.environ["NIXIMAGE_OPERATOR_STORAGE"])
    digest = build.read_tag(storage, repository, tag)
    return str(digest) if digest is not None else None


async def test_apply_gives_ready_with_digest(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.apply(nix_image("jq", ["jq", "bash"], tag="1.0"))
    obj = await wait_reason(cluster, "jq", "Succeeded")
    digest = obj["status"]["digest"]
    assert digest.startswith("sha256:") and obj["status"]["image"].endswith("/jq:1.0")
    assert tag_of(f"{cluster.namespace}/jq", "1.0") == digest
    await cluster.delete("jq")
    await eventually(lambda: tag_of(f"{cluster.namespace}/jq", "1.0") is None, timeout=60)


async def test_missing_packages_then_fixed(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.apply(nix_image("broken", ["jq", "nope"]))
    obj = await wait_reason(cluster, "broken", "MissingPackages")
    assert obj["status"]["missingPackages"] == ["nope"]
    await asyncio.sleep(10)
    assert len(await cluster.builder_pods()) == 1
    await cluster.change_spec("broken", {"packages": ["jq"]})
    await wait_reason(cluster, "broken", "Succeeded")


async def test_restart_mid_build_keeps_one_pod(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.apply(nix_image("slow", ["python3", "coreutils"]))

    async def has_pod() -> bool:
        return bool(await cluster.builder_pods())

    while not await has_pod():
        await asyncio.sleep(0.5)
    await operator.kill()
    await operator.start()
    obj = await wait_reason(cluster, "slow", "Succeeded")
    assert len(await cluster.builder_pods()) == 1 and obj["status"]["attempts"] == 1


async def test_same_packages_share_one_pod(cluster: Cluster, operator: RunningOperator) -> None:
    await cluster.apply(nix_image("one", ["nano", "bash"]))
    await cluster.apply(nix_image("two", ["bash", "nano"]))
    first = await wait_reason(cluster, "one", "Succeeded")
    second = await wait_reason(cluster, "two", "Succeeded")
    assert first["status"]["digest"] == second["status"]["digest"]
    pods = await cluster.builder_pods()
    # The second may have found the build in storage already; never a second pod.
    assert len(pods) <= 1
