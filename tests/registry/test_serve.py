"""``niximage serve`` as a real process: listening, access log, graceful shutdown, flags."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from niximage_core.storage.filesystem import FilesystemStorage
from tests.registry.support import ROOT, RegistryProcess, link_blob, write_images
from testsupport import env as source_env

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with _OPENER.open(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, object]:
    store = FilesystemStorage(tmp_path / "store")
    return tmp_path / "store", write_images(store)


def test_serves_and_logs_json_lines(served: tuple[Path, object]) -> None:
    path, image = served
    with RegistryProcess(path) as registry:
        status, headers, body = get(f"{registry.url}/v2/test/app/manifests/latest?ns=docker.io")
        assert status == 200 and headers["Docker-Content-Digest"] == str(image.manifest.digest)  # type: ignore[attr-defined]
        assert get(f"{registry.url}/v2/nope/manifests/latest")[0] == 404
        assert get(f"{registry.url}/healthz")[0] == 200
        deadline = time.monotonic() + 10
        while len(log := registry.access_log()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # lines are flushed in batches, every quarter second
    manifest_line = next(line for line in log if line["route"] == "manifest")
    assert manifest_line["status"] == 200 and manifest_line["method"] == "GET"
    assert manifest_line["bytes"] == len(body) and manifest_line["duration_ms"] >= 0
    assert {line["status"] for line in log} >= {200, 404}


def test_no_access_log(served: tuple[Path, object]) -> None:
    path, _ = served
    registry = RegistryProcess(path, "--no-access-log")
    with registry:
        assert get(f"{registry.url}/v2/test/app/manifests/latest")[0] == 200
        registry.stop()
        assert registry.access_log() == []


def test_graceful_shutdown_finishes_the_download_in_flight(tmp_path: Path) -> None:
    store = FilesystemStorage(tmp_path / "store")
    image = write_images(store)
    data = os.urandom(64 * 1024 * 1024)
    digest = store.put_blob(data)
    link_blob(store, "test/app", digest, image.manifest)
    with RegistryProcess(tmp_path / "store", "--shutdown-timeout", "20") as registry:
        host, port = registry.address.split(":")
        with socket.create_connection((host, int(port))) as conn:
            request = f"GET /v2/test/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n"
            conn.sendall(request.encode())
            received = conn.recv(65536)  # the download has started
            registry.terminate()
            time.sleep(0.5)  # the server is shutting down while we read slowly
            with pytest.raises(OSError):
                socket.create_connection((host, int(port)), timeout=2).close()
            while chunk := conn.recv(1 << 20):
                received += chunk
        assert registry.process is not None
        assert registry.process.wait(30) == 0
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == data


def test_bad_flags_exit_2_with_one_line(tmp_path: Path) -> None:
    for args in (["--listen", "nope"], ["--workers", "0"], ["--on-demand", "--workers", "2"]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "niximage_registry",
                "--storage",
                str(tmp_path),
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env=source_env(),
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("niximage serve: ") and "Traceback" not in proc.stderr


def test_auth_users_from_a_secret_directory(tmp_path: Path) -> None:
    store = FilesystemStorage(tmp_path / "store")
    write_images(store)
    users = tmp_path / "users"
    users.mkdir()
    (users / "alice").write_text("pw\n")
    with RegistryProcess(tmp_path / "store", "--auth-users", str(users)) as registry:
        status, headers, _ = get(f"{registry.url}/v2/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer realm=")
        request = urllib.request.Request(
            f"{registry.url}/token?scope=repository:test/app:pull",
            headers={"Authorization": "Basic YWxpY2U6cHc="},  # alice:pw
        )
        with _OPENER.open(request, timeout=10) as response:
            token = json.loads(response.read())["token"]
        request = urllib.request.Request(
            f"{registry.url}/v2/test/app/manifests/latest",
            headers={"Authorization": f"Bearer {token}"},
        )
        with _OPENER.open(request, timeout=10) as response:
            assert response.status == 200


def test_workers_share_the_port(tmp_path: Path) -> None:
    store = FilesystemStorage(tmp_path / "store")
    write_images(store)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    registry = RegistryProcess(tmp_path / "store", "--workers", "2")
    registry.argv[registry.argv.index("127.0.0.1:0")] = f"127.0.0.1:{port}"
    with registry:
        deadline = time.monotonic() + 30
        while registry.stderr().count('"listening"') < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = {
            json.loads(line)["pid"]
            for line in registry.stderr().splitlines()
            if '"listening"' in line
        }
        assert len(pids) == 2
        for _ in range(20):
            assert get(f"{registry.url}/v2/test/app/manifests/latest")[0] == 200
        assert registry.process is not None
        registry.terminate()
        assert registry.process.wait(30) == 0


def test_sigterm_stops_within_the_shutdown_timeout(tmp_path: Path) -> None:
    """Fault 6: clients that stop reading mid-blob must not hold SIGTERM for twice
    ``--shutdown-timeout`` (aiohttp's graceful wait, then as long again after cancelling)."""
    store = FilesystemStorage(tmp_path / "store")
    image = write_images(store)
    with RegistryProcess(tmp_path / "store", "--shutdown-timeout", "3") as registry:
        host, port = registry.address.rsplit(":", 1)
        stalled = []
        for _ in range(3):
            connection = socket.create_connection((host, int(port)))
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            request = f"GET /v2/test/app/blobs/{image.big} HTTP/1.1\r\nHost: x\r\n\r\n"
            connection.sendall(request.encode())
            stalled.append(connection)
        time.sleep(1)  # the responses are under way, and stuck on full socket buffers
        started = time.monotonic()
        registry.terminate()
        assert registry.process is not None
        code = registry.process.wait(60)
        took = time.monotonic() - started
        for connection in stalled:
            connection.close()
    assert code == 0 and took < 3 + 1.5, f"SIGTERM took {took:.1f} s"
