"""The emulated API server keeps the API's contract where the operator and kopf rely on it.

Each test is one documented rule (see apiserver.py); if the harness drifted from the real
API, operator tests could pass against behaviour no cluster has.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from apiserver import ApiServer

pytestmark = pytest.mark.asyncio

IMAGES = "/apis/niximage.dev/v1alpha1/namespaces/default/niximages"
PODS = "/api/v1/namespaces/default/pods"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


async def call(server: ApiServer, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with server.request(method, path, **kwargs) as response:
        return response.status, await response.json()


def nix_image(name: str = "x", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "niximage.dev/v1alpha1",
        "kind": "NixImage",
        "metadata": {"name": name},
        "spec": {"packages": ["jq"], **spec},
        "status": {"phase": "Ready"},
    }


async def test_create_stamps_metadata_defaults_and_drops_status(apiserver: ApiServer) -> None:
    code, created = await call(apiserver, "POST", IMAGES, json=nix_image())
    assert code == 201
    metadata = created["metadata"]
    assert metadata["namespace"] == "default" and metadata["generation"] == 1
    assert metadata["uid"] and int(metadata["resourceVersion"]) > 0
    # arch has no default (architectures may be given instead); tag has.
    assert "arch" not in created["spec"] and created["spec"]["tag"] == "latest"
    assert "status" not in created
    code, again = await call(apiserver, "POST", IMAGES, json=nix_image())
    assert (code, again["reason"]) == (409, "AlreadyExists")


async def test_writes_are_validated_against_the_crd(apiserver: ApiServer) -> None:
    code, answer = await call(apiserver, "POST", IMAGES, json=nix_image(packages=["jq", "jq"]))
    assert code == 422 and "Duplicate value" in answer["message"]
    code, answer = await call(apiserver, "POST", IMAGES, json=nix_image(arch="mips"))
    assert code == 422 and "spec.arch" in answer["message"]
    await call(apiserver, "POST", IMAGES, json=nix_image())
    code, answer = await call(
        apiserver, "PATCH", f"{IMAGES}/x/status", json={"status": {"phase": "Odd"}}, headers=MERGE
    )
    assert code == 422


async def test_generation_and_resource_version(apiserver: ApiServer) -> None:
    _, created = await call(apiserver, "POST", IMAGES, json=nix_image())
    rv = int(created["metadata"]["resourceVersion"])
    _, labelled = await call(
        apiserver, "PATCH", f"{IMAGES}/x", json={"metadata": {"labels": {"a": "b"}}}, headers=MERGE
    )
    assert labelled["metadata"]["generation"] == 1
    assert int(labelled["metadata"]["resourceVersion"]) > rv
    _, same = await call(
        apiserver, "PATCH", f"{IMAGES}/x", json={"metadata": {"labels": {"a": "b"}}}, headers=MERGE
    )
    assert same["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]
    _, changed = await call(
        apiserver, "PATCH", f"{IMAGES}/x", json={"spec": {"tag": "v2"}}, headers=MERGE
    )
    assert changed["metadata"]["generation"] == 2


async def test_the_status_subresource_splits_writes(apiserver: ApiServer) -> None:
    await call(apiserver, "POST", IMAGES, json=nix_image())
    both = {"spec": {"tag": "main"}, "status": {"phase": "Ready"}}
    _, main = await call(apiserver, "PATCH", f"{IMAGES}/x", json=both, headers=MERGE)
    assert main["spec"]["tag"] == "main" and "status" not in main
    both = {"spec": {"tag": "status"}, "status": {"phase": "Ready"}}
    _, status = await call(apiserver, "PATCH", f"{IMAGES}/x/status", json=both, headers=MERGE)
    assert status["spec"]["tag"] == "main" and status["status"] == {"phase": "Ready"}
    assert status["metadata"]["generation"] == 2


async def test_preconditions(apiserver: ApiServer) -> None:
    _, created = await call(apiserver, "POST", IMAGES, json=nix_image())
    rv = created["metadata"]["resourceVersion"]
    await call(apiserver, "PATCH", f"{IMAGES}/x", json={"spec": {"tag": "b"}}, headers=MERGE)
    stale = {"metadata": {"resourceVersion": rv}, "spec": {"tag": "c"}}
    code, answer = await call(apiserver, "PATCH", f"{IMAGES}/x", json=stale, headers=MERGE)
    assert (code, answer["reason"]) == (409, "Conflict")
    test = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "replace", "path": "/spec/tag", "value": "d"},
    ]
    code, _ = await call(apiserver, "PATCH", f"{IMAGES}/x", json=test, headers=JSON_PATCH)
    assert code == 422
    apply = {"Content-Type": "application/apply-patch+yaml"}
    code, _ = await call(apiserver, "PATCH", f"{IMAGES}/x", json={}, headers=apply)
    assert code == 415


async def test_finalizers_hold_deletion(apiserver: ApiServer) -> None:
    body = nix_image()
    body["metadata"]["finalizers"] = ["test/hold"]
    await call(apiserver, "POST", IMAGES, json=body)
    code, deleting = await call(apiserver, "DELETE", f"{IMAGES}/x")
    assert code == 200 and deleting["metadata"]["deletionTimestamp"]
    more = {"metadata": {"finalizers": ["test/hold", "test/more"]}}
    code, _ = await call(apiserver, "PATCH", f"{IMAGES}/x", json=more, headers=MERGE)
    assert code == 422
    release = {"metadata": {"finalizers": None}}
    await call(apiserver, "PATCH", f"{IMAGES}/x", json=release, headers=MERGE)
    assert apiserver.find("niximages", "default", "x") is None


async def test_watch_resumes_from_a_version_and_filters_labels(apiserver: ApiServer) -> None:
    _, first = await call(apiserver, "POST", PODS, json=pod("a", {"app": "one"}))
    since = first["metadata"]["resourceVersion"]
    await call(apiserver, "POST", PODS, json=pod("b", {"app": "two"}))
    await call(apiserver, "POST", PODS, json=pod("c", {"app": "one"}))
    _, listed = await call(apiserver, "GET", PODS, params={"labelSelector": "app in (one)"})
    assert listed["kind"] == "PodList"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["a", "c"]
    params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": "1"}
    params["labelSelector"] = "app=one"
    async with apiserver.get(PODS, params=params) as response:
        events = [json.loads(line) async for line in response.content if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "c")]


async def test_a_too_old_version_is_gone(apiserver: ApiServer) -> None:
    apiserver.compacted[("", "pods")] = 10**6
    params = {"watch": "true", "resourceVersion": "1", "timeoutSeconds": "1"}
    async with apiserver.get(PODS, params=params) as response:
        [event] = [json.loads(line) async for line in response.content if line.strip()]
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


async def test_the_garbage_collector_follows_owners(apiserver: ApiServer) -> None:
    _, one = await call(apiserver, "POST", IMAGES, json=nix_image("one"))
    _, two = await call(apiserver, "POST", IMAGES, json=nix_image("two"))
    owned = pod("p", {}, owners=[one, two])
    await call(apiserver, "POST", PODS, json=owned)
    await call(apiserver, "DELETE", f"{IMAGES}/one")
    await asyncio.sleep(0.2)
    remaining = apiserver.find("pods", "default", "p")
    assert remaining is not None
    assert [r["name"] for r in remaining["metadata"]["ownerReferences"]] == ["two"]
    await call(apiserver, "DELETE", f"{IMAGES}/two")
    await asyncio.sleep(0.2)
    assert apiserver.find("pods", "default", "p") is None


async def test_a_namespace_must_exist(apiserver: ApiServer) -> None:
    code, answer = await call(
        apiserver, "POST", "/api/v1/namespaces/nowhere/pods", json=pod("a", {})
    )
    assert code == 404 and "nowhere" in answer["message"]


def pod(
    name: str, labels: dict[str, str], owners: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    references = [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
        }
        for owner in owners or ()
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "ownerReferences": references},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


async def test_status_written_to_the_main_endpoint_is_noticed(apiserver: ApiServer) -> None:
    await call(apiserver, "POST", IMAGES, json=nix_image())
    as_operator = {**MERGE, "User-Agent": "some-operator"}
    await call(apiserver, "PATCH", f"{IMAGES}/x/status", json={"status": {}}, headers=as_operator)
    assert apiserver.status_writes_to_main_endpoint("niximages") == []
    body = {"status": {"phase": "Ready"}}
    await call(apiserver, "PATCH", f"{IMAGES}/x", json=body, headers=as_operator)
    [found] = apiserver.status_writes_to_main_endpoint("niximages")
    assert found.startswith("PATCH /apis/niximage.dev/v1alpha1/namespaces/default/niximages/x")
    apiserver._requests.clear()  # the fixture's own check is not about this test's request
