"""Scheduled garbage collection in the operator: when it runs, what it records, and that it
really collects, alone and inside a running operator."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import eventually

from niximage_core import layout
from niximage_core.errors import StorageError
from niximage_core.storage.filesystem import FilesystemStorage
from niximage_operator import collecting
from niximage_operator.metrics import Metrics
from tests.gc.conftest import backdate
from tests.gc.support import Image, put_image

HOUR = 3600.0
SCHEDULE = collecting.Schedule(interval=24 * HOUR, grace=HOUR)


def test_a_run_is_due_at_once_then_one_interval_after_the_last() -> None:
    assert SCHEDULE.due(None, now=1000.0) == 1000.0
    assert SCHEDULE.due(500.0, now=1000.0) == 500.0 + 24 * HOUR
    assert SCHEDULE.due(5000.0, now=1000.0) == 1000.0  # a record from the future: now


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[FilesystemStorage]:
    store = FilesystemStorage(tmp_path / "storage")
    yield store
    store.close()


def test_the_last_run_is_read_back_and_garbage_is_ignored(storage: FilesystemStorage) -> None:
    assert collecting.read_last_run(storage) is None
    storage.write(collecting.LAST_RUN_KEY, b"{not json")
    assert collecting.read_last_run(storage) is None
    storage.write(collecting.LAST_RUN_KEY, json.dumps({"finished": "yesterday"}).encode())
    assert collecting.read_last_run(storage) is None
    report = collecting.collect_once(storage, SCHEDULE, clock=lambda: 1_700_000_000.0)
    assert collecting.read_last_run(storage) == 1_700_000_000.0
    written = json.loads(storage.read(collecting.LAST_RUN_KEY) or b"")
    assert written["finished"] == "2023-11-14T22:13:20+00:00"
    assert written["report"]["blobs"] == len(report.blobs) == 0
    assert written["report"]["graceSeconds"] == HOUR


def two_images_one_untagged(storage: FilesystemStorage) -> tuple[Image, Image]:
    """Two images sharing a layer; the second's tag is deleted; everything is old."""
    kept = put_image(storage, ["base", "app"], tag=("team/app", "1"))
    gone = put_image(storage, ["base", "old"], tag=("team/old", "1"))
    storage.delete(layout.tag_path("team/old", "1"))
    backdate(Path(storage.url))
    return kept, gone


def blobs(storage: FilesystemStorage) -> set[Any]:
    return {digest for digest, _size, _mtime in storage.list_blobs()}


@pytest.mark.asyncio
async def test_the_loop_collects_when_due_and_not_again_after_a_restart(
    storage: FilesystemStorage,
) -> None:
    kept, gone = two_images_one_untagged(storage)
    metrics = Metrics()
    loop = asyncio.create_task(collecting.run_forever(storage, SCHEDULE, metrics=metrics))
    try:
        await eventually(lambda: storage.read(collecting.LAST_RUN_KEY), timeout=30)
    finally:
        loop.cancel()
    assert blobs(storage) == kept.digests
    only_gone = gone.digests - kept.digests
    assert only_gone and not only_gone & blobs(storage)
    sample = metrics.registry.get_sample_value
    assert sample("niximage_operator_gc_runs_total", {"result": "ok"}) == 1
    deleted = sum(gone.sizes[digest] for digest in only_gone)
    assert sample("niximage_operator_gc_deleted_bytes_total") == deleted
    assert (sample("niximage_operator_gc_last_success_timestamp_seconds") or 0) > 0

    # A restarted loop finds the record and waits a day: a new stale blob stays.
    stale = put_image(storage, ["stale"])
    backdate(Path(storage.url))
    restarted = asyncio.create_task(collecting.run_forever(storage, SCHEDULE))
    await asyncio.sleep(0.5)
    restarted.cancel()
    assert stale.digests <= blobs(storage)


class Unreachable(FilesystemStorage):
    """Storage that fails its first ``failures`` reads, as GCS does while unreachable."""

    failures = 2

    def read(self, key: str) -> bytes | None:
        if self.failures:
            self.failures -= 1
            raise StorageError(f"{self.url}: connection refused")
        return super().read(key)


@pytest.mark.asyncio
async def test_a_failing_storage_is_retried_and_never_stops_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(collecting, "RETRY_AFTER_FAILURE", 0.05)
    storage = Unreachable(tmp_path / "storage")
    kept, _gone = two_images_one_untagged(storage)
    reader = FilesystemStorage(tmp_path / "storage")  # the test's own view, never failing
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger=collecting.__name__):
        loop = asyncio.create_task(collecting.run_forever(storage, SCHEDULE, metrics=metrics))
        try:
            await eventually(lambda: reader.read(collecting.LAST_RUN_KEY), timeout=30)
        finally:
            loop.cancel()
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 2 and "connection refused" in failures[0]
    failed = metrics.registry.get_sample_value(
        "niximage_operator_gc_runs_total", {"result": "failed"}
    )
    assert failed == 2
    assert blobs(storage) == kept.digests


@pytest.mark.asyncio
@pytest.mark.nix
async def test_the_operator_runs_gc_only_when_asked(start_operator: Any, storage_dir: Path) -> None:
    storage = FilesystemStorage(storage_dir)
    kept, _gone = two_images_one_untagged(storage)
    operator = await start_operator()
    await asyncio.sleep(1.0)
    assert storage.read(collecting.LAST_RUN_KEY) is None  # off by default
    await operator.stop()

    await start_operator(gc_interval="24h", gc_grace="1h")
    await eventually(lambda: storage.read(collecting.LAST_RUN_KEY), timeout=30)
    assert blobs(storage) == kept.digests
    storage.close()
