"""The whole path: ``kubectl apply`` → operator → builder pod → storage → ``niximage serve``
→ ``podman pull <registry>/<namespace>/<name>:<tag>`` (the pulled digest is the status's)
→ ``podman run`` of a program from the image; and the same through the kubelet's own
puller: containerd's CRI image service pulls ``status.imageDigest``, ``ctr run`` runs it."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from apiserver import ApiServer
from operator_harness import NAMESPACE, apply, eventually, nix_image, ready

from kubesupport.kubelet import Kubelet
from tests.registry.containerd_node import running_containerd
from tests.registry.cri import Cri
from testsupport import env, podman, podman_env, require

pytestmark = [pytest.mark.asyncio, pytest.mark.nix, pytest.mark.clients]


@pytest_asyncio.fixture
async def registry(storage_dir: Path) -> AsyncIterator[str]:
    """``niximage serve`` on a free port; yields host:port."""
    require("podman")
    command = [sys.executable, "-m", "niximage_cli", "serve", "--storage", str(storage_dir)]
    command += ["--listen", "127.0.0.1:0", "--no-access-log"]
    process = await asyncio.create_subprocess_exec(
        *command, stderr=asyncio.subprocess.PIPE, env=env()
    )
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        address = json.loads(line)["address"]
        yield address
    finally:
        process.terminate()
        await process.wait()


async def test_the_tag_is_pullable_with_podman(
    apiserver: ApiServer,
    kubelet: Kubelet,
    start_operator: Any,
    registry: str,
) -> None:
    await start_operator()
    await apply(apiserver, nix_image("jq", ["jq", "bash"], tag="1.0"))
    obj = await eventually(lambda: ready(apiserver, "jq"), timeout=60)
    reference = f"{registry}/{NAMESPACE}/jq:1.0"
    with tempfile.TemporaryDirectory(prefix="pm-", dir="/tmp") as scratch:
        root = podman_env(Path(scratch))
        await asyncio.to_thread(podman, root, "pull", "--tls-verify=false", reference)
        digest = await asyncio.to_thread(
            podman, root, "image", "inspect", "--format", "{{.Digest}}", reference
        )
        assert digest == obj["status"]["digest"]
        by_digest = obj["status"]["imageDigest"].replace("registry.test:5000", registry)
        await asyncio.to_thread(podman, root, "pull", "--tls-verify=false", by_digest)
        output = await asyncio.to_thread(
            podman, root, "run", "--rm", "--network=none", reference, "jq", "--version"
        )
        assert output.startswith("jq-")


async def test_the_kubelet_path_pulls_the_status_digest_and_runs_it(
    apiserver: ApiServer,
    kubelet: Kubelet,
    start_operator: Any,
    registry: str,
    tmp_path: Path,
) -> None:
    """What a pod spec pinned to ``status.imageDigest`` makes a node do."""
    await start_operator()
    await apply(apiserver, nix_image("tools", ["jq", "bash"], tag="2.0"))
    obj = await eventually(lambda: ready(apiserver, "tools"), timeout=60)
    pinned = obj["status"]["imageDigest"].replace("registry.test:5000", registry)
    with running_containerd(tmp_path / "node") as node:
        cri = Cri(node.socket)
        try:
            image_id = await asyncio.to_thread(cri.pull, pinned)
            status = await asyncio.to_thread(cri.status, pinned)
        finally:
            cri.close()
        assert status is not None and status.id == image_id
        assert pinned in status.repo_digests
        done = await asyncio.to_thread(node.run, pinned, "jq", "--version")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("jq-")
