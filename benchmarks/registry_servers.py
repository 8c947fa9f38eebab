"""Servers and measuring tools for benchmarks/registry.py (loopback only).

- a synthetic image (config, a small layer, a big random layer) written to our storage;
- ``niximage serve`` and Debian's ``docker-registry`` as processes on free 127.0.0.1 ports;
- ``curl`` for one blob download, ``wrk`` for a manifest load, ``/proc`` for RSS;
- ``parallel_get``: many concurrent downloads of one URL at almost no client cost (one
  thread, the bodies discarded by the kernel), and ``RssSampler`` for a server's peak RSS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("core", "builder", "registry", "tests", ".")]

from niximage_core import imagespec, layout, manifest, sources  # noqa: E402
from niximage_core.digest import Digest  # noqa: E402
from niximage_core.storage.base import Storage  # noqa: E402
from testsupport import wait_http  # noqa: E402

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SOURCE = sources.parse_source("path:/benchmark#sha256-" + "C" * 43 + "=")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_image(store: Storage, blob_mb: int) -> tuple[Digest, Digest]:
    """``bench/image:latest``: a small layer and a ``blob_mb`` MB random one. (manifest, big)"""
    small = os.urandom(4096)
    with store.blob_writer() as writer:
        digest = hashlib.sha256()
        remaining = blob_mb * 1_000_000
        while remaining:
            chunk = os.urandom(min(1 << 20, remaining))
            writer.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
        big = Digest(digest.hexdigest())
        writer.commit(big)
    layers = [
        manifest.LayerDescriptor(store.put_blob(small), Digest.of(small), len(small), "small"),
        manifest.LayerDescriptor(big, big, blob_mb * 1_000_000, "big"),
    ]
    spec = imagespec.make_spec(["bench"], SOURCE)
    config = manifest.image_config(spec, layers, None)
    image = manifest.image_manifest(spec, config, layers)
    store.put_blob(config.data)
    store.put_blob(image.data)
    store.write(layout.tag_path("bench/image", "latest"), str(image.digest).encode())
    return image.digest, big


class Server:
    """A server process; ``pids`` includes forked workers (for RSS)."""

    def __init__(
        self, name: str, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.port = port
        self.address = f"127.0.0.1:{port}"
        roots = (ROOT / root for root in ("core", "builder", "registry", "operator", "cli"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, roots)), **(env or {})}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        wait_http(f"http://{self.address}/v2/")

    def pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        found = [self.process.pid]
        if children.exists():
            found += [int(p) for p in children.read_text().split()]
        return found

    def rss_mb(self, field: str = "VmRSS") -> float:
        """The sum over all its processes of ``field``: VmRSS, VmHWM (each one's peak RSS)
        or Pss (shared pages, as after a fork, divided among their processes)."""
        return sum(self.memory_mb(field).values())

    def memory_mb(self, field: str = "VmRSS") -> dict[int, float]:
        """``field`` of each of its processes (see ``rss_mb``), in MiB."""
        source = "smaps_rollup" if field == "Pss" else "status"
        found: dict[int, float] = {}
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/{source}").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            value = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
            found[pid] = int(value.group(1)) / 1024 if value else 0.0
        return found

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_ours(
    store: Path | str,
    work: Path,
    extra: list[str],
    name: str = "niximage",
    env: dict[str, str] | None = None,
) -> Server:
    """``niximage serve`` on ``store`` (a directory or ``gs://bucket/prefix``)."""
    port = free_port()
    argv = [sys.executable, "-m", "niximage_cli", "serve", "--storage", str(store),
            "--listen", f"127.0.0.1:{port}", *extra]  # fmt: skip
    return Server(name, argv, port, work / f"{name}.log", env)


def start_docker_registry(work: Path) -> Server:
    port = free_port()
    config = work / "docker-registry.yml"
    storage = (
        f"{{cache: {{blobdescriptor: inmemory}}, filesystem: {{rootdirectory: {work / 'dr'}}}}}"
    )
    config.write_text(
        f"version: 0.1\nlog: {{level: info}}\nstorage: {storage}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    argv = ["docker-registry", "serve", str(config)]
    return Server("docker-registry", argv, port, work / "docker-registry.log")


def copy_image(source: str, target: str) -> None:
    subprocess.run(
        ["skopeo", "copy", "--preserve-digests", "--src-tls-verify=false",
         "--dest-tls-verify=false", f"docker://{source}", f"docker://{target}"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip


def curl_mb_per_s(url: str) -> float:
    out = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{speed_download}", url],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    return float(out) / 1e6


class _Download:
    """One GET on its own connection: the headers are read, the body only counted."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        self.sock.sendall(request.encode())
        self.sock.setblocking(False)
        self.head = b""
        self.status = 0
        self.remaining = -1  # body bytes still to come; -1 while the headers are incomplete
        self.received = 0
        self.finished = 0.0

    def on_readable(self, scratch: memoryview) -> bool:
        """Read what is there; True once the response is complete (or cut short)."""
        try:
            if self.remaining < 0:
                data = self.sock.recv(65536)
                self._head(data)
                count = len(data)
            else:
                # MSG_TRUNC on TCP: the kernel drops the bytes instead of copying them out.
                count = self.sock.recv_into(
                    scratch, min(self.remaining, len(scratch)), socket.MSG_TRUNC
                )
                self.remaining -= count
                self.received += count
        except BlockingIOError:
            return False
        return count == 0 or self.remaining == 0

    def _head(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self.head[:end].decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        parts = (line.partition(":") for line in lines[1:])
        length = {name.lower(): value for name, _, value in parts}.get("content-length")
        body = len(self.head) - end - 4
        self.head = b""
        self.received = body
        self.remaining = int(length) - body if length is not None else 0


def parallel_get(url: str, clients: int, expected: int) -> dict[str, float]:
    """``clients`` simultaneous GETs of ``url`` (``http://host:port/path``), one connection
    each, driven by one thread with ``selectors``; the bodies are counted, never copied to
    user space, so the client costs little next to the server. Every response must be a
    200 of ``expected`` bytes. Aggregate MB/s is all bytes over the time from the first
    connect to the last byte; the slowest and fastest downloads are given too."""
    host, port, path = _split_url(url)
    scratch = memoryview(bytearray(1 << 20))
    started = time.monotonic()
    downloads = [_Download(host, port, path) for _ in range(clients)]
    with selectors.DefaultSelector() as selector:
        for download in downloads:
            selector.register(download.sock, selectors.EVENT_READ, download)
        while selector.get_map():
            if time.monotonic() - started > 900:
                raise TimeoutError(f"{clients} downloads of {url} still running after 900 s")
            for key, _ in selector.select(timeout=1):
                download = key.data
                if download.on_readable(scratch):
                    download.finished = time.monotonic()
                    selector.unregister(download.sock)
                    download.sock.close()
    bad = [d for d in downloads if d.status != 200 or d.received != expected]
    if bad:
        raise RuntimeError(
            f"{len(bad)} of {clients} downloads of {url} failed: "
            f"status {bad[0].status}, {bad[0].received} of {expected} bytes"
        )
    elapsed = max(d.finished for d in downloads) - started
    seconds = sorted(d.finished - started for d in downloads)
    return {
        "mb_per_s": clients * expected / elapsed / 1e6,
        "seconds": elapsed,
        "fastest_s": seconds[0],
        "slowest_s": seconds[-1],
    }


def _split_url(url: str) -> tuple[str, int, str]:
    found = re.fullmatch(r"http://([^/:]+):(\d+)(/.*)", url)
    if found is None:
        raise ValueError(f"expected http://host:port/path, not {url}")
    return found.group(1), int(found.group(2)), found.group(3)


class RssSampler:
    """The highest RSS and PSS of a server (sums over its processes) while in use, sampled
    every ``interval`` s."""

    def __init__(self, server: Server, interval: float = 0.1) -> None:
        self.server = server
        self.interval = interval
        self.peak_rss_mb = 0.0
        self.peak_pss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._measure()
            self._stop.wait(self.interval)

    def _measure(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, self.server.rss_mb())
        self.peak_pss_mb = max(self.peak_pss_mb, self.server.rss_mb("Pss"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._measure()


def rotated(items: Sequence[T], run: int) -> list[T]:
    """``items`` starting at ``run``'s turn: each server goes first, and last, in turn."""
    shift = run % len(items)
    return [*items[shift:], *items[:shift]]


def wrk(url: str, seconds: int, connections: int, threads: int, accept: str) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-H", f"Accept: {accept}", url],
        check=True, capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def metrics_value(address: str, name: str) -> float:
    with _OPENER.open(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def get_json_status(url: str, accept: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with _OPENER.open(request, timeout=600) as response:
            response.read()
            return response.status, response.headers.get("Docker-Content-Digest", "")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}").get("errors", [{}])[0].get("code", "")
