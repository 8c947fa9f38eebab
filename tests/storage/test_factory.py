"""Storage URLs: what each one opens, and why a bad one is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from niximage_core.errors import InvalidInput
from niximage_core.storage.factory import (
    FilesystemLocation,
    GcsLocation,
    open_storage,
    parse_storage_url,
)
from niximage_core.storage.filesystem import FilesystemStorage

VALID = [
    ("gs://bkt", GcsLocation("bkt", "")),
    ("gs://bkt/", GcsLocation("bkt", "")),
    ("gs://my.bucket_name-1/env/prod/", GcsLocation("my.bucket_name-1", "env/prod")),
    ("GS://bkt/p", GcsLocation("bkt", "p")),
    ("/var/lib/niximage", FilesystemLocation(Path("/var/lib/niximage"))),
    ("/var/lib/../lib/niximage/", FilesystemLocation(Path("/var/lib/niximage"))),
    ("file:///srv/images", FilesystemLocation(Path("/srv/images"))),
    ("file://localhost/srv/images", FilesystemLocation(Path("/srv/images"))),
    ("file:///srv/with%20space", FilesystemLocation(Path("/srv/with space"))),
]


@pytest.mark.parametrize(("url", "expected"), VALID)
def test_valid_urls(url: str, expected: object) -> None:
    assert parse_storage_url(url) == expected


def test_relative_and_home_paths_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse_storage_url("store") == FilesystemLocation(tmp_path / "store")
    assert parse_storage_url("~/store") == FilesystemLocation(tmp_path / "home/store")


INVALID = [
    ("", "empty"),
    ("   ", "empty"),
    ("s3://bucket/x", "unsupported storage URL scheme 's3'"),
    ("https://storage.googleapis.com/b", "unsupported storage URL scheme 'https'"),
    ("gs:/bkt", "invalid GCS URL"),
    ("gs:bkt", "invalid GCS URL"),
    ("gs://", "invalid GCS bucket name"),
    ("gs://ab", "invalid GCS bucket name"),
    ("gs://Bucket", "invalid GCS bucket name"),
    ("gs://-bkt", "invalid GCS bucket name"),
    ("gs://bkt-", "invalid GCS bucket name"),
    ("gs://" + "a" * 64, "invalid GCS bucket name"),
    ("gs://user@bkt/x", "invalid GCS bucket name"),
    ("gs://bkt:443/x", "invalid GCS bucket name"),
    ("gs://bkt?x=1", "no query"),
    ("gs://bkt/p#frag", "no query"),
    ("gs://bkt/a/../b", "invalid prefix"),
    ("gs://bkt/a//b", "invalid prefix"),
    ("gs://bkt/a b", "invalid prefix"),
    ("file://otherhost/srv", "invalid file URL"),
    ("file:relative/dir", "must be absolute"),
    ("/srv/a\0b", "NUL"),
]


@pytest.mark.parametrize(("url", "reason"), INVALID)
def test_invalid_urls(url: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason.replace("?", r"\?")):
        parse_storage_url(url)


def test_open_storage_creates_a_missing_directory(tmp_path: Path) -> None:
    root = tmp_path / "new" / "store"
    storage = open_storage(str(root))
    assert isinstance(storage, FilesystemStorage)
    assert storage.url == str(root)
    assert (root / "blobs" / "sha256").is_dir()
    digest = storage.put_blob(b"x")
    assert open_storage(f"file://{root}").blob_size(digest) == 1


def test_open_storage_does_not_import_google_for_paths(tmp_path: Path) -> None:
    # The registry on a filesystem store should not pay for the Google libraries.
    code = (
        "import sys; from niximage_core.storage.factory import open_storage; "
        f"open_storage({str(tmp_path)!r}); "
        "assert 'google.cloud.storage' not in sys.modules, 'imported google'"
    )
    builder = Path(__file__).resolve().parents[2] / "builder"
    env = {**os.environ, "PYTHONPATH": str(builder)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
