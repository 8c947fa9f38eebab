"""Fault 2 of issue 13: idle and half-open connections must not use up the registry's file
descriptors. The real ``python -m niximage_registry`` under ``RLIMIT_NOFILE`` 512, flooded
with 600 half-open connections; the timeouts and the head-size bound; the gate's policy."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from niximage_core.storage.filesystem import FilesystemStorage
from niximage_registry.limits import (
    ConnectionGate,
    ConnectionLimits,
    RefusalLog,
    default_max_connections,
    listen_backlog,
)
from tests.registry.support import ROOT, Image, write_images
from testsupport import env as source_env

LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LimitedRegistry:
    """``python -m niximage_registry`` with its open-files limit set before it starts."""

    def __init__(self, storage: Path, *args: str, nofile: int | None = None) -> None:
        self.argv = [
            sys.executable, "-m", "niximage_registry",
            "--storage", str(storage), "--listen", "127.0.0.1:0", "--no-access-log", *args,
        ]  # fmt: skip
        self.nofile = nofile
        self.log = storage.parent / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def _limit(self) -> None:
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def __enter__(self) -> LimitedRegistry:
        with self.log.open("wb") as err:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=source_env(),
                cwd=ROOT,
                preexec_fn=self._limit,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.stderr().splitlines():
                if line.startswith("{") and '"listening"' in line:
                    self.address = json.loads(line)["address"]
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"registry did not start:\n{self.stderr()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.address.rsplit(":", 1)
        return host, int(port)


def get(url: str) -> int:
    """The status of ``GET url``, with a generous timeout: the point is that it answers."""
    try:
        with LOCAL.open(url, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, Image]:
    store = FilesystemStorage(tmp_path / "store")
    return tmp_path / "store", write_images(store)


@pytest.fixture
def half_open() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def test_half_open_connections_do_not_lock_out_clients(
    served: tuple[Path, Image], half_open: list[socket.socket]
) -> None:
    path, image = served
    with LimitedRegistry(path, nofile=512) as registry:
        for number in range(600):
            sock = socket.create_connection(registry.host_port, timeout=10)
            half_open.append(sock)
            if number % 2:  # half send part of a request, half nothing at all
                with contextlib.suppress(OSError):  # already evicted
                    sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        base = f"http://{registry.address}"
        for _ in range(3):
            assert get(f"{base}/v2/") == 200
            assert get(f"{base}/v2/test/app/manifests/latest") == 200
            assert get(f"{base}/v2/test/app/blobs/{image.layer_digest}") == 200
        log = registry.stderr()
    assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]
    evictions = [line for line in log.splitlines() if "oldest idle" in line]
    assert 1 <= len(evictions) <= 4, log[-3000:]  # rate-limited: one line per class


def test_header_and_idle_timeouts_close_connections(served: tuple[Path, Image]) -> None:
    path, _ = served
    args = ("--header-timeout", "1", "--idle-timeout", "2")
    with LimitedRegistry(path, *args) as registry:
        silent = socket.create_connection(registry.host_port, timeout=10)
        partial = socket.create_connection(registry.host_port, timeout=10)
        partial.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        idle = socket.create_connection(registry.host_port, timeout=10)
        idle.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        for sock in (silent, partial, idle):
            with sock:
                assert sock.recv(65536) == b""  # closed by the registry, within the timeout
        assert time.monotonic() - started < 9
        assert "without complete request headers" in registry.stderr()


def test_over_large_request_head_is_431(served: tuple[Path, Image]) -> None:
    """Every line and the count are within aiohttp's own limits; their sum is not."""
    path, _ = served
    with LimitedRegistry(path, "--max-header-bytes", "16384") as registry:
        headers = "".join(f"X-Filler-{n}: {'y' * 1000}\r\n" for n in range(40))
        with socket.create_connection(registry.host_port, timeout=10) as sock:
            sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"431", head
        assert json.loads(body)["errors"][0]["code"] == "HEADERS_TOO_LARGE"
        assert get(f"http://{registry.address}/v2/") == 200


def test_bad_connection_flags_exit_2(tmp_path: Path) -> None:
    for args in (["--header-timeout", "0"], ["--max-connections", "-1"]):
        proc = subprocess.run(
            [sys.executable, "-m", "niximage_registry", "--storage", str(tmp_path), *args],
            capture_output=True, text=True, cwd=ROOT, timeout=60, env=source_env(),
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.startswith("niximage serve: "), proc.stderr


# The gate's policy, on stand-in connections.


class Conn:
    def __init__(self, client: str) -> None:
        self.client = client
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def gate(total: int, per_client: int) -> ConnectionGate:
    limits = ConnectionLimits(max_connections=total, max_per_client=per_client)
    return ConnectionGate(limits, RefusalLog(interval=3600))


def test_a_new_connection_evicts_the_oldest_idle_one() -> None:
    connections = gate(total=3, per_client=3)
    first, second, third = Conn("a"), Conn("a"), Conn("b")
    for conn in (first, second, third):
        assert connections.admit(conn)
    connections.busy(first)
    newcomer = Conn("c")
    assert connections.admit(newcomer)
    assert not first.evicted and second.evicted and not third.evicted
    connections.idle(first)  # now idle, but more recently than third
    assert connections.admit(Conn("d")) and third.evicted and not first.evicted
    assert len(connections) == 3


def test_a_client_at_its_bound_evicts_only_its_own_and_busy_ones_never() -> None:
    connections = gate(total=10, per_client=2)
    other = Conn("b")
    mine = [Conn("a"), Conn("a")]
    assert connections.admit(other) and all(connections.admit(c) for c in mine)
    assert connections.admit(Conn("a")) and mine[0].evicted and not other.evicted
    for conn in list(connections._open):
        connections.busy(conn)
    refused = Conn("a")
    assert not connections.admit(refused) and not refused.evicted
    assert connections.admit(Conn("c"))  # other clients still get in
    full = gate(total=1, per_client=1)
    assert full.admit(Conn("x"))
    full.busy(next(iter(full._open)))
    assert not full.admit(Conn("y"))


def test_closed_connections_are_forgotten() -> None:
    connections = gate(total=2, per_client=2)
    conn = Conn("a")
    assert connections.admit(conn)
    connections.forget(conn)
    connections.forget(conn)
    assert len(connections) == 0 and connections._per_client == {}


def test_defaults_leave_descriptors_for_storage_and_the_accept_burst() -> None:
    for nofile in (512, 1024, 65536):
        total, backlog = default_max_connections(nofile), listen_backlog(nofile)
        assert 2 * total + backlog + 64 <= nofile and total >= nofile // 4
    limits = ConnectionLimits(max_per_client=1000).resolved(512)
    assert limits.max_per_client == limits.max_connections == default_max_connections(512)


def test_refusals_are_logged_once_per_interval(caplog: Any) -> None:
    now = [0.0]
    refusals = RefusalLog(interval=10, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="niximage.registry.connections"):
        for _ in range(50):
            refusals.note("refused-total", "10.0.0.1")
            refusals.note("header-timeout", "10.0.0.2")
        now[0] = 11
        refusals.note("refused-total", "10.0.0.3")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "50, the last from 10.0.0.3" in lines[-1]
    assert all(r.exc_info is None for r in caplog.records)
