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
