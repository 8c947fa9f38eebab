"""Servers and measuring tools for benchmarks/registry.py (loopback only).

- a synthetic image (config, a small layer, a big random layer) written to our storage;
- ``niximage serve`` and Debian's ``docker-registry`` as processes on free 127.0.0.1 ports;
- ``curl`` for one blob download, ``wrk`` for a manifest load, ``/proc`` for RSS.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("core", "builder", "registry", "tests")]

from niximage_core import imagespec, layout, manifest, sources  # noqa: E402
from niximage_core.digest import Digest  # noqa: E402
from niximage_core.storage.filesystem import FilesystemStorage  # noqa: E402
from testsupport import wait_http  # noqa: E402

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SOURCE = sources.parse_source("path:/benchmark#sha256-" + "C" * 43 + "=")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_image(root: Path, blob_mb: int) -> tuple[Digest, Digest]:
    """``bench/image:latest``: a small layer and a ``blob_mb`` MB random one. (manifest, big)"""
    store = FilesystemStorage(root)
    small = os.urandom(4096)
    with store.blob_writer() as writer:
        import hashlib

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

    def __init__(self, name: str, argv: list[str], port: int, log: Path) -> None:
        self.name = name
        self.port = port
        self.address = f"127.0.0.1:{port}"
        roots = (ROOT / root for root in ("core", "builder", "registry", "operator", "cli"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, roots))}
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

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            found = re.search(r"VmRSS:\s+(\d+) kB", status)
            total += int(found.group(1)) if found else 0
        return total / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_ours(store: Path, work: Path, extra: list[str]) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "niximage_registry.command", "--storage", str(store),
            "--listen", f"127.0.0.1:{port}", *extra]  # fmt: skip
    return Server("niximage", argv, port, work / "niximage.log")


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
