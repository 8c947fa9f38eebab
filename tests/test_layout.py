"""Guards for the repository layout (research/aesthetics.md §7): the component folders are
source roots, not packages, so the standard library's ``operator`` always wins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_component_folders_are_not_packages() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "builder" / "__init__.py").exists()


def test_stdlib_operator_wins_from_repo_root() -> None:
    # -S skips .pth files, so nothing (like an editable-install finder) preloads the stdlib
    # module and hides a shadowing package in the working directory.
    out = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import operator; operator.itemgetter; print(operator.__file__)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not Path(out).resolve().is_relative_to(ROOT), out


def test_plain_python_from_repo_root_gets_stdlib_operator() -> None:
    subprocess.run(
        [sys.executable, "-c", "import operator; operator.itemgetter"], cwd=ROOT, check=True
    )
