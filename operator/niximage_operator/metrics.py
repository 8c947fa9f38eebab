"""The operator's Prometheus metrics (``--metrics-port``; the chart scrapes them).

Imports prometheus-client only. Counted where the operator already decides: every
condition change (the same moment it posts an Event, so reasons are the status's), every
builder pod it creates, every garbage collection; and the builder pods running, each
time one changes. One ``CollectorRegistry`` per operator: tests run several in one
process, and nothing global leaks between them.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        on = {"registry": self.registry}
        self.condition_changes = Counter(
            "niximage_operator_condition_changes",
            "NixImage condition changes (one Event each), by reason and Event type",
            ["reason", "type"],
            **on,
        )
        self.builder_pods_created = Counter(
            "niximage_operator_builder_pods_created",
            "Builder pods the operator created (attempts, shared builds count once)",
            **on,
        )
        self.builder_pods_running = Gauge(
            "niximage_operator_builder_pods_running",
            "Builder pods that hold a build slot now",
            **on,
        )
        self.gc_runs = Counter(
            "niximage_operator_gc_runs",
            "Scheduled garbage collections, by result (ok, failed)",
            ["result"],
            **on,
        )
        self.gc_deleted_bytes = Counter(
            "niximage_operator_gc_deleted_bytes",
            "Bytes of blobs scheduled garbage collection deleted",
            **on,
        )
        self.gc_last_success = Gauge(
            "niximage_operator_gc_last_success_timestamp_seconds",
            "When the last scheduled garbage collection finished without error (Unix time)",
            **on,
        )

    def serve(self, port: int, address: str = "0.0.0.0") -> WSGIServer:
        """``/metrics`` (any path, as prometheus-client answers) on a thread; ``shutdown()``
        stops it."""
        server, _thread = start_http_server(port, address, registry=self.registry)
        return server
