"""Packing many layers at once: ``pack_layers_parallel`` runs ``LayerJob``s a few at a time,
in child processes (``workers``) or in threads, and returns their results in job order.

Imports packing, streaming and workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from typing import Literal

from niximage_builder.tarball.packing import LayerJob
from niximage_builder.tarball.streaming import PackedLayer
from niximage_builder.tarball.workers import ProcessPacker

Parallelism = Literal["processes", "threads"]


def pack_layers_parallel(
    jobs: Sequence[LayerJob], workers: int | None = None, mode: Parallelism = "processes"
) -> list[PackedLayer]:
    """Pack layers ``workers`` at a time; results in job order; sinks written in this process.

    ``processes`` (the default) packs in child interpreters (``ProcessPacker``) and relays
    the compressed bytes to each job's sink from a thread of this process, so sinks never
    cross a process boundary. ``threads`` packs in the threads themselves. Hashing and
    compression release the GIL in both, but a layer of many small files spends much of
    its time in Python (walk, headers, open), and threads then queue for the GIL. Measured
    with ``benchmarks/pack.py`` on 2 CPUs (2026-11-29): on a synthetic 800 MB tree of
    43,000 entries processes took 0.85 of the time of threads (peak RSS 97 MB against 51);
    at 22,000 entries and on ``big`` + ``python3`` (mostly 1 MiB files) the two are within
    noise. Workers cost about 0.2 s to start and 25 MB each. ``build`` packs in threads:
    for a phase that is rarely the bottleneck, the gain does not pay for the workers. The
    first failure cancels the jobs not yet started and is raised once the running ones have
    finished.
    """
    if not jobs:
        return []
    count = min(len(jobs), workers or os.cpu_count() or 1)
    if mode == "threads":
        return _in_threads([job.run for job in jobs], count)
    with ProcessPacker(count) as packer:
        return _in_threads([partial(packer.pack, job) for job in jobs], count)


def _in_threads(tasks: Sequence[Callable[[], PackedLayer]], count: int) -> list[PackedLayer]:
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="pack") as pool:
        futures = [pool.submit(task) for task in tasks]
        _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    return [future.result() for future in futures]
