"""Shared helpers for tests that run the real command line (not fixtures: plain functions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTPKGS = ROOT / "nix" / "testpkgs"
SOURCE_ROOTS = ("core", "builder", "registry", "operator", "cli")


LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""An opener for local servers: no HTTP proxy from the environment in between."""


def wait_http(url: str, timeout: float = 60) -> None:
    """Return once ``url`` answers (any HTTP status); raise the last error after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with LOCAL.open(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an answer, if not a 2xx
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def env() -> dict[str, str]:
    """The environment for ``python -m niximage_cli``: our sources first."""
    result = dict(os.environ)
    paths = [str(ROOT / root) for root in SOURCE_ROOTS]
    result["PYTHONPATH"] = os.pathsep.join([*paths, result.get("PYTHONPATH", "")]).rstrip(":")
    result.pop("NIXIMAGE_PACKAGE_SOURCE", None)
    return result


def niximage(
    *args: str, check: bool = True, timeout: float = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``niximage`` command line and return the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", "niximage_cli", *args],
        capture_output=True,
        text=True,
        env={**env(), **(extra_env or {})},
        cwd=ROOT,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"niximage {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
        )
    return proc


def niximage_json(*args: str) -> Any:
    return json.loads(niximage(*args).stdout)


def require(*programs: str) -> None:
    """Skip unless every program is installed (scripts/install.sh installs them)."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


ARM64_ROOT = Path(os.environ.get("NIXIMAGE_DEBIAN_ROOTS", "/var/lib/niximage/debian")) / "arm64"


def require_arm64() -> None:
    """Skip unless arm64 builds and runs here: qemu-user's aarch64 binfmt_misc handler with
    the F flag, Nix's extra-platforms, and the unpacked arm64 Debian packages (all set up
    by scripts/install-arm64.sh)."""
    handler = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    flags = handler.read_text() if handler.exists() else ""
    if "flags: " not in flags or "F" not in flags.split("flags: ", 1)[1].split("\n", 1)[0]:
        pytest.skip("arm64: no aarch64 binfmt_misc handler with the F flag (install-arm64.sh)")
    config = subprocess.run(
        ["nix", "show-config"], capture_output=True, text=True, check=False
    ).stdout
    if not any(
        line.startswith("extra-platforms") and "aarch64-linux" in line
        for line in config.splitlines()
    ):
        pytest.skip("arm64: Nix's extra-platforms lacks aarch64-linux (install-arm64.sh)")
    if not (ARM64_ROOT / "packages").exists():
        pytest.skip(f"arm64: no Debian arm64 packages in {ARM64_ROOT} (install-arm64.sh)")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, umoci unpack)")


def podman_env(work: Path) -> dict[str, str]:
    """An isolated podman: vfs storage under ``work``, runc and lowered ulimits.

    On this kind of VM podman as root cannot raise nofile/nproc (no CAP_SYS_RESOURCE) and
    crun rejects the hybrid cgroup set-up (the README's "Pulling with podman").
    """
    require("podman", "runc")
    require_root()
    work.mkdir(parents=True, exist_ok=True)
    (work / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    (work / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{work / "run"}"\ngraphroot = "{work / "root"}"\n'
    )
    return {
        **os.environ,
        "CONTAINERS_CONF": str(work / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
    }


def podman(environment: dict[str, str], *args: str, timeout: float = 180) -> str:
    """Run podman in the environment of ``podman_env``; fail with its stderr."""
    proc = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=environment
    )
    assert proc.returncode == 0, f"podman {' '.join(args)}:\n{proc.stderr}"
    return proc.stdout.strip()
