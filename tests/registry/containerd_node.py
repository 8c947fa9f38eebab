"""A real containerd 1.6 (Debian's) as a node's image service, for tests: its own
directories, socket and CRI registry configuration, and ``ctr run`` kept apart from the
host's runc state and cgroups. Import as ``tests.registry.containerd_node``.

docs/kubelet-containerd.md has what it asks of a registry.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testsupport import require, require_root

RUN_DIR = Path("/run/containerd")
"""containerd 1.6 puts shim sockets under /run/containerd/s whatever its state directory."""


@dataclass
class Containerd:
    work: Path
    socket: str
    certs: Path

    def trust_plain_http(self, host: str) -> None:
        """The node-side recipe of docs/kubelet-containerd.md for a plain-HTTP registry."""
        directory = self.certs / host
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(
            f'server = "http://{host}"\n'
            'capabilities = ["push"]\n\n'
            f'[host."http://{host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "-a", self.socket, "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run(self, reference: str, *command: str) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm``, with runc's state, FIFOs and cgroup kept apart from the host's."""
        name = f"niximage-test-{os.getpid()}-{time.monotonic_ns()}"
        return self.ctr(
            "run", "--rm",
            "--runc-root", str(self.work / "runc"),
            "--fifo-dir", str(self.work / "fifo"),
            "--cgroup", f"/{name}",
            reference, name, *command,
        )  # fmt: skip


@contextlib.contextmanager
def running_containerd(work: Path) -> Iterator[Containerd]:
    """containerd with its CRI plugin, state under ``work``; skips without root or tools."""
    require_root()
    require("containerd", "ctr", "runc")
    certs = work / "certs.d"
    certs.mkdir(parents=True, exist_ok=True)
    sock = str(work / "containerd.sock")
    config = work / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{work / "root"}"\nstate = "{work / "state"}"\n'
        f'[grpc]\n  address = "{sock}"\n'
        f'[ttrpc]\n  address = "{sock}.ttrpc"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{work / "opt"}"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n'
        f'[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{certs}"\n'
    )
    had_run_dir = RUN_DIR.exists()
    with open(work / "containerd.log", "wb") as log:
        # Its own session: a signal to the test's process group does not reach it.
        process = subprocess.Popen(
            ["containerd", "--config", str(config)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    node = Containerd(work, sock, certs)
    try:
        deadline = time.monotonic() + 30
        while node.ctr("version", timeout=10).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (work / "containerd.log").read_text()[-3000:]
                pytest.fail(f"containerd did not start:\n{log_text}")
            time.sleep(0.2)
        yield node
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if not had_run_dir:
            for leftover in (RUN_DIR / "s", RUN_DIR):
                with contextlib.suppress(OSError):
                    leftover.rmdir()
