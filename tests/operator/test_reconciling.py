"""reconciling: the decisions put to work, with a fake API and real or failing storage.

What the emulator scenarios cannot easily stage: storage failing under the operator,
losing a creation race, a name clash, the build-slot count.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from operator_samples import UID, body, pod, settings, sources, target

from niximage_core import layout
from niximage_core.errors import StorageError
from niximage_core.storage.filesystem import FilesystemStorage
from niximage_operator import kube, observations, podspec, reconciling
from niximage_operator.observations import PodObservation

NOW = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)


class FakeKube:
    """Pods in a dict; records what the operator asked for."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[str] = []
        self.nudged: list[tuple[str, str, str]] = []

    async def create_pod(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        key = (manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        if key in self.pods:
            raise kube.AlreadyExists(409, "exists")
        created = copy.deepcopy(dict(manifest))
        created["metadata"]["uid"] = f"uid-{len(self.created)}"
        created["status"] = {"phase": "Pending"}
        self.pods[key] = created
        self.created.append(key[1])
        return copy.deepcopy(created)

    async def add_pod_owner(
        self, namespace: str, name: str, owner: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        found = self.pods.get((namespace, name))
        if found is None:
            return None
        references = found["metadata"].setdefault("ownerReferences", [])
        if all(ref["uid"] != owner["metadata"]["uid"] for ref in references):
            references.append(podspec.owner_reference(owner, controller=not references))
        return copy.deepcopy(found)

    async def nudge_image(
        self, namespace: str, name: str, still_wants: Callable[[Any], bool], pod: str, phase: str
    ) -> bool:
        self.nudged.append((name, pod, phase))
        return True

    def close(self) -> None:
        pass


class BrokenStorage(FilesystemStorage):
    def read(self, key: str) -> bytes | None:
        raise StorageError(f"cannot read {key}: bucket unavailable")


def context(storage: Any, fake: FakeKube, **overrides: Any) -> reconciling.Context:
    config = settings(**overrides)
    return reconciling.Context(
        settings=config,
        package_sources=sources(),
        storage=storage,
        kube=fake,  # type: ignore[arg-type]
        slots=reconciling.Slots(config.max_concurrent_builds),
        clock=lambda: NOW,
    )


def index(*pods: dict[str, Any]) -> tuple[Any, Callable[[], Iterable[PodObservation]]]:
    seen = [o for o in map(observations.observe, pods) if o is not None]

    def pods_of(namespace: str, key: str) -> list[PodObservation]:
        return [o for o in seen if (o.namespace, o.key) == (namespace, key)]

    return pods_of, lambda: seen


async def reconcile(
    ctx: reconciling.Context, obj: dict[str, Any], *pods: dict[str, Any], retry: int = 0
) -> reconciling.Reconciled:
    pods_of, all_pods = index(*pods)
    return await reconciling.reconcile(ctx, obj, pods_of, all_pods, retry)


def ready_reason(outcome: reconciling.Reconciled) -> str:
    return next(c["reason"] for c in outcome.status["conditions"] if c["type"] == "Ready")


@pytest.mark.asyncio
async def test_a_new_build_creates_its_pod(tmp_path: Path) -> None:
    fake = FakeKube()
    ctx = context(FilesystemStorage(tmp_path), fake)
    outcome = await reconcile(ctx, body())
    assert fake.created == [podspec.pod_name(target().key, 1)]
    assert ready_reason(outcome) == "BuilderPending" and outcome.retry_after is None
    created = ctx.metrics.registry.get_sample_value("niximage_operator_builder_pods_created_total")
    assert created == 1
    assert "builderPod" not in outcome.status  # the pod handler reports the pod
    assert [e.reason for e in outcome.events] == ["BuilderPending"]


@pytest.mark.asyncio
async def test_losing_the_creation_race_adopts_the_pod(tmp_path: Path) -> None:
    fake = FakeKube()
    key = target().key
    theirs = pod(key, phase="Running", owners=("someone-else",))
    fake.pods[("default", theirs["metadata"]["name"])] = theirs
    outcome = await reconcile(context(FilesystemStorage(tmp_path), fake), body())
    assert fake.created == []  # the index had not shown the pod yet: 409, then adoption
    adopted = fake.pods[("default", theirs["metadata"]["name"])]
    owners = [ref["uid"] for ref in adopted["metadata"]["ownerReferences"]]
    assert owners == ["someone-else", UID]
    assert ready_reason(outcome) == "Building"


@pytest.mark.asyncio
async def test_a_pod_of_another_key_under_our_name_is_reported(tmp_path: Path) -> None:
    fake = FakeKube()
    key = target().key
    clash = pod(key)
    clash["metadata"]["annotations"][podspec.KEY_ANNOTATION] = "0" * 64
    fake.pods[("default", clash["metadata"]["name"])] = clash
    outcome = await reconcile(context(FilesystemStorage(tmp_path), fake), body())
    assert ready_reason(outcome) == "BuildFailed"
    assert "belongs to build key 000" in outcome.status["conditions"][0]["message"]


class RefusingKube(FakeKube):
    """An API server whose admission turns builder pods away, as a ResourceQuota does."""

    async def create_pod(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        name = manifest["metadata"]["name"]
        raise kube.KubeError(
            403,
            f'pods "{name}" is forbidden: exceeded quota: compute, requested: requests.cpu=1,'
            " used: requests.cpu=4, limited: requests.cpu=4",
        )


@pytest.mark.asyncio
async def test_a_refused_builder_pod_is_said_in_the_status_and_retried(tmp_path: Path) -> None:
    fake = RefusingKube()
    ctx = context(FilesystemStorage(tmp_path), fake, retry_delay=10.0)
    outcome = await reconcile(ctx, body(), retry=2)
    ready = next(c for c in outcome.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "BuilderRejected" and ready["status"] == "False"
    assert "exceeded quota: compute" in ready["message"]
    assert podspec.pod_name(target().key, 1) in ready["message"]
    # The third retry: 10 s doubled twice, less up to 20 % jitter (fixed by the build key).
    assert outcome.retry_after is not None and 32 <= outcome.retry_after <= 40
    assert [(e.reason, e.warning) for e in outcome.events] == [("BuilderRejected", True)]
    assert ctx.slots.in_use([], 0.0) == 0  # no slot is held for a pod that does not exist


@pytest.mark.asyncio
async def test_no_free_slot_queues_and_comes_back(tmp_path: Path) -> None:
    fake = FakeKube()
    busy = pod("f" * 64, phase="Running")
    ctx = context(FilesystemStorage(tmp_path), fake, max_concurrent_builds=1, queue_recheck=7)
    outcome = await reconcile(ctx, body(), busy)
    assert fake.created == []
    assert outcome.retry_after == 7 and ready_reason(outcome) == "BuilderPending"
    assert "1 of 1 builder pods in use" in outcome.retry_message
    done = pod("f" * 64, phase="Succeeded")
    outcome = await reconcile(ctx, body(), done)
    assert len(fake.created) == 1


def test_slots_count_our_creations_until_the_watch_shows_them() -> None:
    slots = reconciling.Slots(2)
    slots.reserve("default", "a", now=100.0)
    assert slots.in_use([], now=101.0) == 1
    seen = observations.observe(pod(target().key, phase="Succeeded"))
    assert seen is not None
    slots.reserve("default", seen.name, now=100.0)
    assert slots.in_use([seen], now=101.0) == 1  # finished: its slot is free again
    assert slots.in_use([], now=100.0 + reconciling.RESERVATION_TTL + 1) == 0


@pytest.mark.asyncio
async def test_storage_trouble_is_reported_and_retried(tmp_path: Path) -> None:
    fake = FakeKube()
    ctx = context(BrokenStorage(tmp_path), fake, storage_retry_delay=2, retry_max_delay=50)
    outcome = await reconcile(ctx, body(), retry=3)
    assert ready_reason(outcome) == "StorageError"
    assert outcome.retry_after is not None and 12.8 <= outcome.retry_after <= 16
    assert "bucket unavailable" in outcome.retry_message
    assert outcome.status["phase"] == "Retrying" and fake.created == []


@pytest.mark.asyncio
async def test_storage_trouble_does_not_unready_a_ready_image(tmp_path: Path) -> None:
    was_ready = {
        "type": "Ready",
        "status": "True",
        "reason": "Succeeded",
        "message": "",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    status = {"buildKey": target().key, "observedGeneration": 1, "conditions": [was_ready]}
    outcome = await reconcile(context(BrokenStorage(tmp_path), FakeKube()), body(status=status))
    assert outcome.status == {} and outcome.events == [] and outcome.retry_after is not None


class CountingStorage(FilesystemStorage):
    """Counts what the operator asks of storage."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def read(self, key: str) -> bytes | None:
        self.reads.append(key)
        return super().read(key)


@pytest.mark.asyncio
async def test_a_ready_image_whose_tag_stands_costs_one_read(tmp_path: Path) -> None:
    """What an operator restart does for each Ready NixImage: read its tag, and nothing
    else (no build lookup, no touch of its blobs). A tag that moved, or a changed spec,
    takes the full way."""
    storage = CountingStorage(tmp_path)
    digest = storage.put_blob(b'{"schemaVersion": 2}')
    tagged = target()
    storage.write(layout.tag_path(tagged.repository, tagged.tag), str(digest).encode())
    was_ready = {"type": "Ready", "status": "True", "reason": "Succeeded", "message": ""}
    status = {
        "buildKey": tagged.key,
        "observedGeneration": 1,
        "digest": str(digest),
        "conditions": [was_ready],
    }
    fake = FakeKube()
    outcome = await reconcile(context(storage, fake), body(status=status))
    assert (outcome.status, outcome.events, outcome.retry_after) == ({}, [], None)
    assert storage.reads == [layout.tag_path(tagged.repository, tagged.tag)]
    assert fake.created == []

    storage.reads.clear()
    moved = {**status, "digest": "sha256:" + "0" * 64}
    await reconcile(context(storage, fake), body(status=moved))
    assert layout.build_key_path(tagged.key) in storage.reads  # the full reconcile


@pytest.mark.asyncio
async def test_an_invalid_spec_touches_nothing(tmp_path: Path) -> None:
    fake = FakeKube()
    broken = body(packages=("jq",), tag="a b")
    outcome = await reconcile(context(FilesystemStorage(tmp_path), fake), broken)
    assert ready_reason(outcome) == "InvalidSpec" and outcome.retry_after is None
    assert "invalid tag" in outcome.status["conditions"][0]["message"]
    assert fake.created == []


@pytest.mark.asyncio
async def test_pod_news_reaches_waiting_images_once(tmp_path: Path) -> None:
    fake = FakeKube()
    ctx = context(FilesystemStorage(tmp_path), fake)
    key = target().key
    running = pod(key, phase="Running")
    name = running["metadata"]["name"]
    entries = [
        reconciling.ImageEntry("a", (name, "Pending")),
        reconciling.ImageEntry("b", (name, "Running")),
        reconciling.ImageEntry("c", ("other-pod", "Running")),
    ]
    pods_of, _ = index(running)
    await reconciling.report_pod(ctx, running, False, lambda ns, k: entries, pods_of)
    assert fake.nudged == [("a", name, "Running"), ("c", name, "Running")]

    stale = pod(key, attempt=1, phase="Failed")
    pods_of, _ = index(stale, pod(key, attempt=2, phase="Running"))
    await reconciling.report_pod(ctx, stale, False, lambda ns, k: entries, pods_of)
    assert len(fake.nudged) == 2  # an old attempt's news is old news


def test_the_index_entries() -> None:
    obj = body(status={"builderPod": "p", "builderPhase": "Running"})
    assert reconciling.index_image(obj, sources()) == {
        ("default", target().key): reconciling.ImageEntry("jq", ("p", "Running"))
    }
    assert reconciling.index_image(body(tag="a b"), sources()) == {}
    assert list(reconciling.index_pod(pod(target().key))) == [("default", target().key)]


def test_previous_tag() -> None:
    assert reconciling.previous_tag({"image": "reg:5000/ns/name:v1"}) == "v1"
    assert reconciling.previous_tag({"image": "reg:5000/ns/name"}) is None
    assert reconciling.previous_tag({}) is None
