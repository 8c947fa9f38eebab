"""Fixtures: every backend behind one ``backend`` fixture, and the GCS emulator."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.storage.backends import Backend, filesystem_backend, gcs_backend


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
