"""The operator in-process against the emulated API server, with a kubelet that really runs
``niximage build`` on the offline package set into filesystem storage.

Each test acts as the user (HTTP calls like kubectl's) and reads what the operator left
in the API server and in storage. The ``apiserver`` fixture checks, after each test, that
every NixImage version ever stored validates strictly against the CRD schema.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from apiserver import ApiServer
from operator_harness import (
    NAMESPACE,
    REGISTRY,
    apply,
    change_spec,
    condition,
    delete,
    events_about,
    eventually,
    image,
    nix_image,
    owners_of,
    phase_is,
    pod_phase,
    pods_created,
    ready,
    reason_is,
    tag_of,
)

from kubesupport.kubelet import Gate, Kubelet, ProcessRuntime, ScriptedRuntime, Termination, summary
from niximage_core import layout
from niximage_core.storage import factory
from testsupport import niximage_json

pytestmark = [pytest.mark.asyncio, pytest.mark.nix]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_of(port: int) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}`` (comments dropped)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_apply_gives_ready_with_digest_tag_and_events(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any, storage_dir: Path
) -> None:
    port = free_port()
    await start_operator(metrics_port=port)
    await apply(apiserver, nix_image("jq", ["jq", "bash"], tag="1.0"))
    obj = await eventually(lambda: ready(apiserver, "jq"), timeout=60)

    status = obj["status"]
    digest = status["digest"]
    assert digest.startswith("sha256:")
    assert status["image"] == f"{REGISTRY}/{NAMESPACE}/jq:1.0"
    assert status["imageDigest"] == f"{REGISTRY}/{NAMESPACE}/jq@{digest}"
    assert status["phase"] == "Ready"
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 1
    assert status["layers"]["count"] >= 2 and status["size"] > 0
    assert status["buildTimes"]["seconds"]["total"] > 0
    assert status["attempts"] == 1 and status["builderPod"] == pods_created(apiserver)[0]
    assert condition(obj)["reason"] == "Succeeded" and digest in condition(obj)["message"]
    assert condition(obj, "Building")["status"] == "False"
    # The registry serves the name through this mapping; the full result is behind the key.
    assert tag_of(storage_dir, f"{NAMESPACE}/jq", "1.0") == digest
    storage = factory.open_storage(str(storage_dir))
    result = json.loads(storage.read(layout.build_key_path(status["buildKey"])) or b"{}")
    assert result["manifestDigest"] == digest
    # One event per transition, Normal all the way.
    await eventually(lambda: ("Normal", "Succeeded") in events_about(apiserver, "jq"))
    assert sorted(events_about(apiserver, "jq")) == [
        ("Normal", "BuilderPending"),
        ("Normal", "Building"),
        ("Normal", "Succeeded"),
    ]
    # The builder pod: what the operator asked the kubelet to run.
    pod = apiserver.find("pods", NAMESPACE, status["builderPod"])
    assert pod is not None and pod["spec"]["restartPolicy"] == "Never"
    assert [ref["name"] for ref in pod["metadata"]["ownerReferences"]] == ["jq"]
    # What the operator asked of the API (the fixture checks RBAC covers it all).
    used = apiserver.accesses(("kopf/", "niximage-operator/"))
    assert {
        ("watch", "niximage.dev", "niximages"),
        ("patch", "niximage.dev", "niximages/status"),
        ("create", "", "pods"),
        ("watch", "", "pods"),
        ("create", "", "events"),
    } <= used
    # The same story in the operator's metrics, as Prometheus scrapes them.
    scraped = await asyncio.to_thread(metrics_of, port)
    assert scraped["niximage_operator_builder_pods_created_total"] == 1
    for reason in ("BuilderPending", "Building", "Succeeded"):
        key = f'niximage_operator_condition_changes_total{{reason="{reason}",type="Normal"}}'
        assert scraped[key] == 1, key
    assert scraped["niximage_operator_builder_pods_running"] == 0


async def test_a_build_already_in_storage_needs_no_pod(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any, storage_dir: Path
) -> None:
    prebuilt = niximage_json("build", "bash", "jq", "--storage", str(storage_dir))
    await start_operator()
    await apply(apiserver, nix_image("cached", ["jq", "bash"]), namespace="team-b")
    obj = await eventually(lambda: ready(apiserver, "cached", "team-b"), timeout=30)
    assert obj["status"]["digest"] == prebuilt["manifestDigest"]
    assert obj["status"]["buildKey"] == prebuilt["buildKey"]  # the builder's key, exactly
    assert "found in storage" in condition(obj)["message"]
    assert pods_created(apiserver) == []
    assert tag_of(storage_dir, "team-b/cached", "latest") == prebuilt["manifestDigest"]


async def test_missing_packages_are_reported_once_and_fixing_the_spec_builds(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any
) -> None:
    await start_operator()
    await apply(apiserver, nix_image("broken", ["jq", "nope", "python3.nope"]))
    obj = await eventually(lambda: reason_is(apiserver, "broken", "MissingPackages"), timeout=60)
    assert obj["status"]["missingPackages"] == ["nope", "python3.nope"]
    assert obj["status"]["phase"] == "Failed"
    assert condition(obj)["status"] == "False"
    assert "nope, python3.nope" in condition(obj)["message"]
    assert condition(obj, "Building")["status"] == "False"
    await eventually(lambda: ("Warning", "MissingPackages") in events_about(apiserver, "broken"))
    # No retry loop: well past several retry delays, still the one pod.
    await asyncio.sleep(2.0)
    assert len(pods_created(apiserver)) == 1
    assert condition(image(apiserver, "broken"))["reason"] == "MissingPackages"

    await change_spec(apiserver, "broken", {"packages": ["jq"]})
    obj = await eventually(lambda: ready(apiserver, "broken"), timeout=60)
    assert "missingPackages" not in obj["status"]
    assert obj["status"]["observedGeneration"] == 2
    assert len(pods_created(apiserver)) == 2


async def test_operator_killed_mid_build_resumes_without_a_second_pod(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any
) -> None:
    gate: Gate = kubelet.runtime.gate  # type: ignore[attr-defined]
    gate.close()
    first = await start_operator()
    await apply(apiserver, nix_image("slow", ["python3"]))
    await eventually(lambda: reason_is(apiserver, "slow", "Building"))
    await eventually(lambda: gate.arrived == 1)
    await first.kill()

    await start_operator()
    await asyncio.sleep(1.0)  # the restarted operator has resumed and found the pod
    gate.open()
    obj = await eventually(lambda: ready(apiserver, "slow"), timeout=60)
    assert len(pods_created(apiserver)) == 1
    assert obj["status"]["attempts"] == 1


async def test_a_build_that_ends_while_the_operator_is_down_is_picked_up(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any
) -> None:
    gate: Gate = kubelet.runtime.gate  # type: ignore[attr-defined]
    gate.close()
    first = await start_operator()
    await apply(apiserver, nix_image("offline", ["coreutils"]))
    await eventually(lambda: gate.arrived == 1)
    await first.kill()
    gate.open()
    pod = pods_created(apiserver)[0]
    await eventually(lambda: pod_phase(apiserver, pod) == "Succeeded", timeout=60)

    await start_operator()
    await eventually(lambda: ready(apiserver, "offline"), timeout=30)
    assert len(pods_created(apiserver)) == 1


async def test_same_packages_share_one_pod_owned_by_both(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any, storage_dir: Path
) -> None:
    gate: Gate = kubelet.runtime.gate  # type: ignore[attr-defined]
    gate.close()
    await start_operator()
    await apply(apiserver, nix_image("first", ["jq", "bash"]))
    await apply(apiserver, nix_image("second", ["bash", "jq"]))
    await eventually(lambda: image(apiserver, "second").get("status", {}).get("builderPod"))
    [pod_name] = pods_created(apiserver)
    await eventually(lambda: len(owners_of(apiserver, pod_name)) == 2)
    owners = owners_of(apiserver, pod_name)
    assert sorted(ref["name"] for ref in owners) == ["first", "second"]
    assert sum(ref["controller"] for ref in owners) == 1

    gate.open()
    one = await eventually(lambda: ready(apiserver, "first"), timeout=60)
    two = await eventually(lambda: ready(apiserver, "second"), timeout=30)
    assert one["status"]["digest"] == two["status"]["digest"]
    assert pods_created(apiserver) == [pod_name]
    assert tag_of(storage_dir, f"{NAMESPACE}/second", "latest") == two["status"]["digest"]

    # Builder pods go with their last owner; tags go with their NixImage.
    await delete(apiserver, "first")
    await eventually(lambda: apiserver.find("niximages", NAMESPACE, "first") is None)
    await eventually(lambda: tag_of(storage_dir, f"{NAMESPACE}/first", "latest") is None)
    await eventually(lambda: [r["name"] for r in owners_of(apiserver, pod_name)] == ["second"])
    await delete(apiserver, "second")
    await eventually(lambda: apiserver.find("pods", NAMESPACE, pod_name) is None)
    await eventually(lambda: tag_of(storage_dir, f"{NAMESPACE}/second", "latest") is None)


async def test_an_evicted_builder_is_retried_with_the_attempt_counted(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any
) -> None:
    evicted = Termination(
        137, pod_reason="Evicted", pod_message="The node was low on resource: memory."
    )
    kubelet.runtime = ScriptedRuntime([evicted], then=kubelet.runtime)
    await start_operator()
    await apply(apiserver, nix_image("evicted", ["jq"]))
    obj = await eventually(lambda: ready(apiserver, "evicted"), timeout=60)
    assert obj["status"]["attempts"] == 2
    assert len(pods_created(apiserver)) == 2
    assert ("Warning", "BuildFailed") in events_about(apiserver, "evicted")


async def test_a_builder_storage_error_is_retried_then_given_up(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any
) -> None:
    def storage_error(pod: dict[str, Any]) -> Termination:
        message = "storage /x: bucket unavailable"
        return Termination(1, summary(pod, ok=False, kind="StorageError", message=message))

    kubelet.runtime = ScriptedRuntime([storage_error] * 3)
    await start_operator(max_attempts=3)
    await apply(apiserver, nix_image("flaky", ["jq"]))
    obj = await eventually(lambda: phase_is(apiserver, "flaky", "Failed"))
    assert condition(obj)["reason"] == "StorageError"
    assert obj["status"]["attempts"] == 3
    assert "gave up after 3 attempts" in condition(obj)["message"]
    await asyncio.sleep(1.0)
    assert len(pods_created(apiserver)) == 3


async def test_builds_wait_for_a_free_slot(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any
) -> None:
    gate = Gate(open_=False)
    runtime = ProcessRuntime(gate)
    kubelet.runtime = runtime
    await start_operator(max_concurrent_builds=1)
    await apply(apiserver, nix_image("one", ["jq"]))
    await eventually(lambda: gate.arrived == 1)
    await apply(apiserver, nix_image("two", ["bash"]))
    queued = await eventually(lambda: reason_is(apiserver, "two", "BuilderPending"))
    assert "waiting for a free build slot (1 of 1" in condition(queued)["message"]
    assert queued["status"]["phase"] == "Pending"
    await asyncio.sleep(1.5)  # several re-checks later, still queued
    assert len(pods_created(apiserver)) == 1

    gate.open()
    await eventually(lambda: ready(apiserver, "one"), timeout=60)
    await eventually(lambda: ready(apiserver, "two"), timeout=60)
    assert len(pods_created(apiserver)) == 2
    assert gate.arrived == 2


async def test_a_path_the_builders_lack_is_an_invalid_spec(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any
) -> None:
    await start_operator()
    body = nix_image("elsewhere", ["jq"], packageSource={"type": "path", "path": "/srv/pkgs"})
    await apply(apiserver, body)
    obj = await eventually(lambda: reason_is(apiserver, "elsewhere", "InvalidSpec"))
    assert "/srv/pkgs is not available to builders" in condition(obj)["message"]
    assert obj["status"]["phase"] == "Failed"
    assert pods_created(apiserver) == []
    await eventually(lambda: ("Warning", "InvalidSpec") in events_about(apiserver, "elsewhere"))


async def test_a_new_tag_moves_the_mapping_without_a_build(
    apiserver: ApiServer, kubelet: Kubelet, start_operator: Any, storage_dir: Path
) -> None:
    await start_operator()
    await apply(apiserver, nix_image("moving", ["jq"], tag="v1"))
    obj = await eventually(lambda: ready(apiserver, "moving"), timeout=60)
    digest = obj["status"]["digest"]
    await change_spec(apiserver, "moving", {"tag": "v2"})
    obj = await eventually(
        lambda: (o := ready(apiserver, "moving")) and o["status"]["observedGeneration"] == 2 and o
    )
    assert obj["status"]["image"] == f"{REGISTRY}/{NAMESPACE}/moving:v2"
    assert tag_of(storage_dir, f"{NAMESPACE}/moving", "v2") == digest
    assert tag_of(storage_dir, f"{NAMESPACE}/moving", "v1") is None
    assert len(pods_created(apiserver)) == 1
