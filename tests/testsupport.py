"""Shared helpers for tests that run the real command line (not fixtures: plain functions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTPKGS = ROOT / "nix" / "testpkgs"


def env() -> dict[str, str]:
    """The environment for ``python -m niximage_builder``: our sources first."""
    result = dict(os.environ)
    paths = [str(ROOT / "builder"), str(ROOT / "operator")]
    result["PYTHONPATH"] = os.pathsep.join([*paths, result.get("PYTHONPATH", "")]).rstrip(":")
    result.pop("NIXIMAGE_PACKAGE_SOURCE", None)
    return result


def niximage(
    *args: str, check: bool = True, timeout: float = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``niximage`` command line and return the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", "niximage_builder", *args],
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
