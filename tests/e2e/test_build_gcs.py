"""Builds into Google Cloud Storage (fake-gcs-server): the same image as on a filesystem,
and an outage in the middle of an upload leaves no visible blob and a clear error."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from google.cloud.storage.retry import DEFAULT_RETRY

from niximage_builder import build, nixcli
from niximage_core import imagespec, sources
from niximage_core.errors import StorageError
from niximage_core.storage.gcs import GcsStorage
from tests.storage.gcs_emulator import GcsEmulator, find_binary
from testsupport import TESTPKGS, niximage, niximage_json, require

pytestmark = [pytest.mark.nix, pytest.mark.gcs]


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[GcsEmulator]:
    require("nix-build")
    if find_binary() is None:
        pytest.skip("fake-gcs-server is not installed")
    # The filesystem backend keeps objects across a restart, so the outage test can look
    # at exactly what the killed server had stored.
    with GcsEmulator(data_dir=tmp_path / "gcs") as server:
        server.create_bucket("images")
        yield server


def test_gcs_build_equals_filesystem_build(
    emulator: GcsEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packages = ["bash", "jq", "python3"]
    on_disk = niximage_json("build", *packages, "--storage", str(tmp_path / "fs"))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    in_gcs = niximage_json("build", *packages, "--storage", "gs://images/prod", "--tag", "t/app:1")
    assert in_gcs["manifestDigest"] == on_disk["manifestDigest"]
    assert in_gcs["bytesUploaded"] > 0
    again = niximage_json("build", *packages, "--storage", "gs://images/prod", "--rebuild")
    assert again["manifestDigest"] == on_disk["manifestDigest"] and again["bytesUploaded"] == 0
    client = emulator.client()
    tag = client.bucket("images").blob("prod/tags/t/app/_tags/1").download_as_bytes()
    assert tag.decode() == on_disk["manifestDigest"]


class KillingStorage:
    """A GcsStorage whose blob writers kill the emulator once ``after`` bytes went out."""

    def __init__(self, inner: GcsStorage, emulator: GcsEmulator, after: int) -> None:
        self.inner, self.emulator, self.after = inner, emulator, after
        self.written = 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @contextmanager
    def blob_writer(self) -> Iterator[Any]:
        with self.inner.blob_writer() as writer:
            original = writer.write

            def write(data: bytes) -> None:
                with self.lock:
                    self.written += len(data)
                    if self.written > self.after and self.emulator.running:
                        self.emulator.kill()
                original(data)

            writer.write = write
            yield writer


def test_outage_mid_upload_leaves_no_blob_and_next_build_succeeds(
    emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    source = nixcli.pin_source(sources.parse_source(f"path:{TESTPKGS}"), nixcli.NixSettings())
    spec = imagespec.make_spec(["big", "jq"], source)
    # A short retry deadline: the default (two minutes) would only make the test slow.
    quick = DEFAULT_RETRY.with_timeout(5.0)
    storage = GcsStorage("images", client=emulator.client(), retry=quick)
    options = build.BuildOptions(use_cache=False)
    with pytest.raises(StorageError) as failure:
        build.build_image(
            spec, KillingStorage(storage, emulator, 8 << 20), nixcli.NixSettings(), options
        )
    message = str(failure.value)
    assert "gs://images" in message or "GCS" in message or "storage" in message.lower()
    assert "Traceback" not in message

    emulator.start()
    client = emulator.client()
    visible = [b for b in client.list_blobs("images", prefix="blobs/")]
    for blob in visible:  # whatever was published is complete and verified
        assert hashlib.sha256(blob.download_as_bytes()).hexdigest() == blob.name.rsplit("/", 1)[1]

    result = build.build_image(
        spec, GcsStorage("images", client=client), nixcli.NixSettings(), options
    )
    assert result.ok and result.manifestDigest is not None
    assert client.bucket("images").get_blob("blobs/sha256/" + result.manifestDigest[7:]) is not None


def test_cli_reports_an_unreachable_storage_clearly() -> None:
    require("nix-build")
    proc = niximage(
        "build",
        "jq",
        "--storage",
        "gs://images",
        check=False,
        timeout=300,
        extra_env={
            "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
            "NIXIMAGE_GCS_RETRY_DEADLINE": "3",
        },
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "gs://images" in proc.stderr
