"""Fixtures: a store on each backend with a way to make everything in it old, a fake Nix.

Filesystem stores age instantly (mtimes set two hours back, grace 1 h). GCS objects carry
server timestamps nobody can set, so GCS stores use a grace period of ``GCS_GRACE`` seconds
and age by waiting it out.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from niximage_builder import nixcli
from niximage_core import checkpoints, gc
from tests.gc.support import FakeNix
from tests.storage.backends import Backend, filesystem_backend, gcs_backend

GCS_GRACE = 1.0


@dataclass
class Store:
    """A storage under test, its grace period, and how to make its contents old."""

    backend: Backend
    grace: float
    age: Callable[[], None]
    """Make every blob and temporary file older than the grace period."""

    @property
    def storage(self) -> Any:
        return self.backend.storage

    @property
    def name(self) -> str:
        return self.backend.name

    def collect(self, dry_run: bool = False) -> gc.Report:
        return gc.collect(self.storage, self.grace, dry_run)


def backdate(root: Path, seconds: float = 7200) -> None:
    """Set every file's mtime ``seconds`` back (blobs, temporary files)."""
    then = time.time() - seconds
    for directory, _dirs, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(directory, name), (then, then))


@pytest.fixture(scope="session")
def delete_preconditions(gcs_client: Any) -> bool:
    """Whether the server honours ifMetagenerationMatch on DELETE, which gc's delete relies
    on (Google does; fake-gcs-server does not)."""
    from google.api_core import exceptions

    name = f"probe-{uuid.uuid4().hex[:12]}"
    gcs_client.create_bucket(name)
    blob = gcs_client.bucket(name).blob("x")
    blob.upload_from_string(b"x")
    try:
        blob.delete(if_metageneration_match=99)
    except exceptions.PreconditionFailed:
        return True
    except exceptions.NotFound:
        pass
    return False


@pytest.fixture
def gcs_atomic_delete(delete_preconditions: bool, monkeypatch: pytest.MonkeyPatch) -> bool:
    """On a server without DELETE preconditions, make touch and delete-if-stale exclusive in
    this process (what ``ifMetagenerationMatch`` gives on Google's servers); True if shimmed."""
    if delete_preconditions:
        return False
    from niximage_core.storage.gcs import GcsStorage

    lock = threading.Lock()
    touch, delete = GcsStorage.touch_blob, GcsStorage.delete_blob_if_stale

    def locked_touch(storage: Any, digest: Any) -> Any:
        with lock:
            return touch(storage, digest)

    def locked_delete(storage: Any, digest: Any, cutoff: float) -> str:
        with lock:
            return delete(storage, digest, cutoff)

    monkeypatch.setattr(GcsStorage, "touch_blob", locked_touch)
    monkeypatch.setattr(GcsStorage, "delete_blob_if_stale", locked_delete)
    return True


@pytest.fixture
def no_gcs_shim() -> None:
    """Requested by a test that must see the server's own DELETE semantics."""


@pytest.fixture(params=["filesystem", pytest.param("gcs", marks=pytest.mark.gcs)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "filesystem":
        root = tmp_path / "store"
        made = Store(filesystem_backend(root), 3600.0, lambda: backdate(root))
    else:
        client = request.getfixturevalue("gcs_client")
        if "no_gcs_shim" not in request.fixturenames:
            request.getfixturevalue("gcs_atomic_delete")
        bucket = f"t-{uuid.uuid4().hex[:16]}"
        client.create_bucket(bucket)
        made = Store(gcs_backend(client, bucket), GCS_GRACE, lambda: time.sleep(GCS_GRACE + 0.2))
    yield made
    made.storage.close()


@pytest.fixture
def fake_nix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNix:
    nix = FakeNix(tmp_path / "nix-store")
    nix.root.mkdir()
    monkeypatch.setattr(nixcli, "realise", nix.realise)
    return nix


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """``hooks(gate, ...)`` installs gates at gc/build checkpoints for one test."""

    def install(*gates: Any) -> Any:
        from tests.gc.support import Hooks

        installed = Hooks(*gates)
        monkeypatch.setattr(checkpoints, "CHECKPOINT", installed)
        return installed

    return install
