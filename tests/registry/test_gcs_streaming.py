"""Faults 3 and 4 of issue 13: blobs the registry streams from GCS (``--no-redirect``, or
credentials that cannot sign). The real ``niximage serve`` over a real fake-gcs-server.

- Storage failing mid-blob (the emulator killed) aborts the connection: the client sees a
  short read within seconds instead of waiting forever for the rest of the body.
- Memory per concurrent stream stays small: reads follow what the socket drained, in small
  pieces, one streaming request per blob (it was one 8 MiB buffer per stream).

``python -m tests.registry.test_gcs_streaming 200`` prints the RSS figures for 200 streams.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from niximage_core.digest import Digest
from niximage_core.storage.gcs import GcsStorage
from tests.registry.support import RegistryProcess, link_blob, write_images
from tests.storage.gcs_emulator import GcsEmulator, own_emulator

pytestmark = pytest.mark.gcs
MIB = 1 << 20


@pytest.fixture
def emulator() -> Iterator[GcsEmulator]:
    """An emulator of this test's own: one test kills it."""
    yield from own_emulator()


def stored_blob(emulator: GcsEmulator, size: int) -> tuple[str, Digest]:
    """A bucket with the test images and one ``size``-byte blob, servable under test/app."""
    bucket = f"stream-{uuid.uuid4().hex[:8]}"
    emulator.create_bucket(bucket)
    storage = GcsStorage(bucket, "registry", emulator.client())
    image = write_images(storage)  # type: ignore[arg-type]
    digest = storage.put_blob(os.urandom(size))
    link_blob(storage, "test/app", digest, image.manifest)
    storage.close()
    return f"gs://{bucket}/registry", digest


def registry_for(emulator: GcsEmulator, url: str, *args: str) -> RegistryProcess:
    environment = {"STORAGE_EMULATOR_HOST": emulator.url, "GOOGLE_CLOUD_PROJECT": "test"}
    return RegistryProcess(url, "--no-redirect", "--no-access-log", *args, env=environment)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def test_storage_failing_mid_blob_aborts_the_connection(emulator: GcsEmulator) -> None:
    url, digest = stored_blob(emulator, 48 * MIB)
    with registry_for(emulator, url, "--storage-deadline", "2") as registry:
        host, port = registry.address.split(":")
        with socket.create_connection((host, int(port)), timeout=60) as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            conn.sendall(f"GET /v2/test/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = b""
            while len(received) < MIB:
                received += conn.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
            emulator.kill()
            started = time.monotonic()
            try:
                while chunk := conn.recv(1 << 20):
                    received += chunk
            except ConnectionResetError:
                pass  # the abort: a reset, not a clean end
            waited = time.monotonic() - started
        # Before the fix the registry answered a second response into the body and kept
        # the connection open: the client waited for the missing bytes until its timeout.
        assert waited < 30, f"the client waited {waited:.0f} s"
        body = received.partition(b"\r\n\r\n")[2]
        assert len(body) < 48 * MIB
        assert b'"errors"' not in body[-4096:]  # no JSON error inside the blob's bytes
        log = registry.stderr()
    aborted = [line for line in log.splitlines() if "aborted" in line]
    assert len(aborted) == 1 and "Traceback" not in log, log[-3000:]


async def stream_all(url: str, count: int, pid: int, budget: float) -> tuple[int, int]:
    """``count`` concurrent GETs of ``url`` read slowly (64 KiB every 20 ms, each stops after
    4 MiB or ``budget`` s). Returns the baseline and the highest RSS seen meanwhile."""
    baseline = memory(pid)["VmRSS"]
    peak = baseline
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, memory(pid)["VmRSS"])
            await asyncio.sleep(0.1)

    async def one(session: ClientSession) -> int:
        read = 0
        deadline = time.monotonic() + budget
        async with session.get(url) as response:
            assert response.status == 200
            while read < 4 * MIB and time.monotonic() < deadline:
                read += len(await response.content.readexactly(64 * 1024))
                await asyncio.sleep(0.02)
        return read

    sampler = asyncio.create_task(sample())
    connector = TCPConnector(limit=0, force_close=True)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=120)) as session:
        reads = await asyncio.gather(*(one(session) for _ in range(count)))
    done.set()
    await sampler
    assert all(reads)
    return baseline, max(peak, memory(pid)["VmHWM"])


def measure(emulator: GcsEmulator, streams: int, size: int) -> tuple[int, int, int]:
    """Baseline RSS, peak RSS and RSS after ``streams`` concurrent streams of one blob."""
    url, digest = stored_blob(emulator, size)
    with registry_for(emulator, url) as registry:
        assert registry.process is not None
        pid = registry.process.pid
        blob = f"{registry.url}/v2/test/app/blobs/{digest}"
        asyncio.run(stream_all(blob, 1, pid, 30))  # warm: imports, pools, first allocations
        baseline, peak = asyncio.run(stream_all(blob, streams, pid, 60))
        time.sleep(1)
        return baseline, peak, memory(pid)["VmRSS"]


def test_memory_per_stream_stays_small(emulator: GcsEmulator) -> None:
    streams = 50
    baseline, peak, _after = measure(emulator, streams, 16 * MIB)
    per_stream = (peak - baseline) / streams
    # It was about 8 MiB a stream (an 8 MiB range buffered for each): now a few pieces.
    assert per_stream < 2 * MIB, f"{per_stream / MIB:.1f} MiB a stream (peak {peak / MIB:.0f} MiB)"


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with GcsEmulator() as running:
        base, top, after = measure(running, count, 25 * 1000 * 1000)
    print(f"{count} streams: baseline {base / MIB:.0f} MiB, peak {top / MIB:.0f} MiB, ", end="")
    print(f"after {after / MIB:.0f} MiB")
