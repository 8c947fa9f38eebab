"""Prometheus metrics of one registry process (``/metrics``).

Each app gets its own ``CollectorRegistry``: tests build many apps in one process, and
nothing global leaks between them. With ``--workers N`` every worker has its own numbers;
the ``worker`` label keeps their series apart (a scrape reaches one worker per request).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120)
_BUILD_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class Metrics:
    def __init__(self, worker: str = "0") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.worker = worker
        labels = {"registry": self.registry}
        self.requests = Counter(
            "niximage_registry_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status", "worker"],
            **labels,
        )
        self.latency = Histogram(
            "niximage_registry_request_duration_seconds",
            "Time to answer a request (for blobs: until the body was handed to the kernel)",
            ["route", "worker"],
            buckets=_LATENCY_BUCKETS,
            **labels,
        )
        self.bytes_served = Counter(
            "niximage_registry_bytes_served",
            "Body bytes sent, by route (redirected blobs are not counted)",
            ["route", "worker"],
            **labels,
        )
        self.redirects = Counter(
            "niximage_registry_blob_redirects",
            "Blob GETs answered with a 307 to a signed storage URL",
            ["worker"],
            **labels,
        )
        self.cache = Counter(
            "niximage_registry_cache_lookups",
            "In-memory cache lookups by cache (tag, manifest, repository) and result",
            ["cache", "result", "worker"],
            **labels,
        )
        self.builds = Counter(
            "niximage_registry_builds",
            "On-demand builds finished, by result (ok, missing, failed, error)",
            ["result", "worker"],
            **labels,
        )
        self.build_duration = Histogram(
            "niximage_registry_build_duration_seconds",
            "Wall-clock time of on-demand builds",
            ["worker"],
            buckets=_BUILD_BUCKETS,
            **labels,
        )
        self.builds_running = Gauge(
            "niximage_registry_builds_in_progress",
            "On-demand builds started and not yet finished (running or queued)",
            ["worker"],
            **labels,
        )
        self.build_waiters = Counter(
            "niximage_registry_build_waits",
            "Requests that waited for an on-demand build, by whether they started it",
            ["started", "worker"],
            **labels,
        )

        # ``labels()`` validates and locks on every call (5% of a manifest request under
        # load); the children for the few label sets we use are kept here instead.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels, self.worker)
        return child

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, method, str(status)).inc()
        self._child(self.latency, route).observe(seconds)

    def sent(self, route: str, count: int) -> None:
        self._child(self.bytes_served, route).inc(count)

    def cache_lookup(self, cache: str, hit: bool) -> None:
        self._child(self.cache, cache, "hit" if hit else "miss").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
