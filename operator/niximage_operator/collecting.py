"""Garbage collection on a schedule, inside the operator (``gc_interval``; off by default).

Imports niximage_core's gc and the storage interface, and metrics. One task beside
kopf: it sleeps until a run is due, runs ``gc.collect`` in a thread (it blocks on storage
for minutes on a large bucket), logs the summary and records the run in storage
(``gc/last-run``). The record keeps the schedule across restarts: an operator restarted
more often than the interval still collects, and one restarted in a loop does not collect
on every start.

gc is safe beside running builds and the registry by its own protocol (leases, grace
period; see niximage_core.gc), so the operator needs no lock of its own around it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from niximage_core import gc
from niximage_core.errors import NixImageError
from niximage_core.storage.base import Storage
from niximage_core.units import format_duration
from niximage_operator.metrics import Metrics

log = logging.getLogger(__name__)

LAST_RUN_KEY = "gc/last-run"
RETRY_AFTER_FAILURE = 900.0
"""Seconds before trying again after a failed run (storage away), if sooner than the
interval: a failed run is not a run."""


@dataclass(frozen=True)
class Schedule:
    interval: float
    grace: float

    def due(self, last_run: float | None, now: float) -> float:
        """When the next run is due: at once if gc never ran (or the record is from the
        future: a clock moved), else one interval after the last run."""
        if last_run is None or last_run > now:
            return now
        return last_run + self.interval


def read_last_run(storage: Storage) -> float | None:
    """The finish time of the last recorded run (epoch seconds), if a valid record exists."""
    raw = storage.read(LAST_RUN_KEY)
    if raw is None:
        return None
    try:
        return datetime.fromisoformat(json.loads(raw)["finished"]).timestamp()
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable %s: collecting now", LAST_RUN_KEY)
        return None


def record(report: gc.Report, finished: float) -> bytes:
    """The ``gc/last-run`` object: when, and the report's numbers (for people looking)."""
    summary = {k: v for k, v in report.to_json().items() if k not in ("blobs", "spared")}
    summary["blobs"] = len(report.blobs)
    stamp = datetime.fromtimestamp(finished, UTC).isoformat()
    return json.dumps({"finished": stamp, "report": summary}, indent=2).encode()


def collect_once(storage: Storage, schedule: Schedule, clock: Callable[[], float]) -> gc.Report:
    """One gc run and its record (blocking)."""
    report = gc.collect(storage, grace=schedule.grace)
    storage.write(LAST_RUN_KEY, record(report, clock()))
    return report


async def run_forever(
    storage: Storage,
    schedule: Schedule,
    clock: Callable[[], float] = time.time,
    metrics: Metrics | None = None,
) -> None:
    """Collect whenever due, until cancelled. Failures are logged and retried, never
    raised: gc going wrong must not stop the operator. Cancelling leaves a run already in
    its thread to finish or fail on its own; gc is built to be interrupted anywhere."""
    log.info(
        "garbage collection every %s (grace %s)",
        format_duration(schedule.interval),
        format_duration(schedule.grace),
    )
    while True:
        try:
            last_run = await asyncio.to_thread(read_last_run, storage)
            delay = schedule.due(last_run, clock()) - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            report = await asyncio.to_thread(collect_once, storage, schedule, clock)
        except Exception as exc:  # whatever went wrong, the operator goes on
            if metrics is not None:
                metrics.gc_runs.labels("failed").inc()
            wait = min(schedule.interval, RETRY_AFTER_FAILURE)
            if isinstance(exc, NixImageError):
                log.warning("garbage collection failed, next try in %.0f s: %s", wait, exc)
            else:
                log.exception("garbage collection failed, next try in %.0f s", wait)
            await asyncio.sleep(wait)
            continue
        if metrics is not None:
            metrics.gc_runs.labels("ok").inc()
            metrics.gc_deleted_bytes.inc(report.bytes)
            metrics.gc_last_success.set(clock())
        log.info("garbage collection: %s", report.render().replace("\n", "; "))
        for problem in report.dangling:
            log.warning("garbage collection: %s", problem)
