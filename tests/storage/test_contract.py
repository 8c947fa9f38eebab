"""The storage contract (docs/architecture.md#storage-layout), run against every backend.

What the builder, the registry, gc and the operator may rely on whichever backend is
configured: blobs appear only complete and verified, metadata is replaced atomically,
hostile keys never reach a backend, and debris of crashed writers is never listed or read.
"""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import time
import tracemalloc
from typing import Any

import pytest

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NotFound, StorageError
from niximage_core.storage import base
from niximage_core.storage.base import blob_key, iter_chunks
from tests.storage.backends import GCS_CHUNK, Backend

MiB = 1 << 20
# GCS paths: one create-only request; a resumable upload finished by its only chunk; one
# whose size is a whole number of chunks (an empty final request); several chunks.
SIZES = [
    pytest.param(100, id="small"),
    pytest.param(GCS_CHUNK * 3 // 4, id="one-chunk"),
    pytest.param(2 * GCS_CHUNK, id="exact-chunks"),
    pytest.param(3 * GCS_CHUNK + 5, id="chunked"),
]


@pytest.mark.parametrize("backend_class", ["filesystem", "gcs"])
def test_every_backend_implements_the_whole_interface(backend_class: str) -> None:
    """One interface, no optional parts: callers never probe a backend with hasattr."""
    from niximage_core.storage.filesystem import FilesystemStorage
    from niximage_core.storage.gcs import GcsStorage

    cls = {"filesystem": FilesystemStorage, "gcs": GcsStorage}[backend_class]
    wanted = {
        name
        for name, member in vars(base.Storage).items()
        if callable(member) and not name.startswith("_")
    }
    assert len(wanted) >= 17
    missing = sorted(name for name in wanted if not callable(getattr(cls, name, None)))
    assert not missing, f"{cls.__name__} lacks {missing}"


def payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(f"{seed}".encode()).digest() * 64  # 2 KiB, varies with seed
    return (block * (size // len(block) + 1))[:size]


def visible_blobs(storage: Any) -> list[tuple[Digest, int]]:
    return [(digest, size) for digest, size, _ in storage.list_blobs()]


def read_all(storage: Any, digest: Digest) -> bytes:
    with storage.open_blob(digest) as stream:
        return b"".join(iter_chunks(stream))


# blobs


def test_put_blob_then_read_it_back(storage: Any) -> None:
    data = b'{"mediaType": "application/vnd.oci.image.config.v1+json"}'
    digest = storage.put_blob(data)
    assert digest == Digest.of(data)
    assert storage.blob_size(digest) == len(data)
    assert read_all(storage, digest) == data
    assert visible_blobs(storage) == [(digest, len(data))]


def test_empty_blob(storage: Any) -> None:
    digest = storage.put_blob(b"")
    assert storage.blob_size(digest) == 0
    assert read_all(storage, digest) == b""


def test_missing_blob(storage: Any) -> None:
    missing = Digest.of(b"never stored")
    assert storage.blob_size(missing) is None
    with pytest.raises(NotFound, match=str(missing)):
        storage.open_blob(missing)
    storage.delete_blob(missing)  # absent is fine


@pytest.mark.parametrize("size", SIZES)
def test_streaming_writer(storage: Any, size: int) -> None:
    data = payload(size)
    with storage.blob_writer() as writer:
        for start in range(0, size, 100_000):
            writer.write(data[start : start + 100_000])
        writer.commit(Digest.of(data))
    assert storage.blob_size(Digest.of(data)) == size
    assert read_all(storage, Digest.of(data)) == data


def test_open_blob_is_seekable(storage: Any) -> None:
    # The registry serves Range requests by seeking.
    data = payload(2 * MiB + 3)
    digest = storage.put_blob(data)
    with storage.open_blob(digest) as stream:
        stream.seek(MiB + 1)
        assert stream.read(10) == data[MiB + 1 : MiB + 11]
        assert stream.tell() == MiB + 11
        stream.seek(-3, os.SEEK_END)
        assert stream.read() == data[-3:]
        stream.seek(0)
        assert stream.read(5) == data[:5]


def test_50_mb_in_1_mib_writes_with_bounded_memory(backend: Backend) -> None:
    storage = backend.storage
    if backend.name == "gcs":
        # fake-gcs-server copies the whole object on every chunk it receives (quadratic):
        # fewer, bigger upload requests keep this test fast. Writes stay 1 MiB.
        storage.chunk_size = 4 * MiB
    chunks, chunk = 50, MiB
    source = os.urandom(chunk + chunks)  # each write is a different slice of this
    expected = hashlib.sha256()
    for i in range(chunks):
        expected.update(source[i : i + chunk])
    digest = Digest(expected.hexdigest())

    gc.collect()
    tracemalloc.start()
    try:
        with storage.blob_writer() as writer:
            for i in range(chunks):
                writer.write(source[i : i + chunk])  # a fresh 1 MiB bytes, as a producer's
            writer.commit(digest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Disk: nothing but the caller's write. GCS: about two upload chunks (the library's
    # buffer and the request body) besides the write. Whole-blob buffering: 50 MiB.
    limit = 2 * MiB if backend.name == "filesystem" else 2 * MiB + 3 * storage.chunk_size
    assert peak < limit, f"peak {peak / MiB:.1f} MiB while writing a 50 MiB blob"
    assert storage.blob_size(digest) == chunks * chunk
    with storage.open_blob(digest) as stream:
        check = hashlib.sha256()
        for piece in iter_chunks(stream, 4 * MiB):
            check.update(piece)
    assert check.hexdigest() == digest.hex


@pytest.mark.parametrize("size", SIZES)
def test_digest_mismatch_stores_nothing(backend: Backend, size: int) -> None:
    storage = backend.storage
    data = payload(size)
    wrong = Digest.of(b"something else")
    with storage.blob_writer() as writer:
        writer.write(data)
        with pytest.raises(StorageError, match="digest mismatch"):
            writer.commit(wrong)
    assert storage.blob_size(wrong) is None
    assert storage.blob_size(Digest.of(data)) is None
    assert visible_blobs(storage) == []
    assert backend.raw_names() == []  # no temp debris either


@pytest.mark.parametrize("size", SIZES)
def test_exception_inside_the_block_stores_nothing(backend: Backend, size: int) -> None:
    storage = backend.storage
    data = payload(size)
    with pytest.raises(RuntimeError, match="producer failed"), storage.blob_writer() as writer:
        writer.write(data)
        raise RuntimeError("producer failed")
    assert storage.blob_size(Digest.of(data)) is None
    assert backend.raw_names() == []


@pytest.mark.parametrize("size", SIZES)
def test_leaving_without_commit_stores_nothing(backend: Backend, size: int) -> None:
    with backend.storage.blob_writer() as writer:
        writer.write(payload(size))
    assert visible_blobs(backend.storage) == []
    assert backend.raw_names() == []


@pytest.mark.parametrize("size", SIZES)
def test_committing_an_existing_blob_is_fine(backend: Backend, size: int) -> None:
    storage = backend.storage
    data = payload(size)
    digest = storage.put_blob(data)
    assert storage.put_blob(data) == digest
    with storage.blob_writer() as writer:
        writer.write(data)
        writer.commit(digest)
    assert visible_blobs(storage) == [(digest, size)]
    assert read_all(storage, digest) == data
    assert backend.raw_names() == [blob_key(digest)]  # no temp debris


def test_concurrent_writers_of_the_same_blob(storage: Any) -> None:
    data = payload(3 * MiB)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with storage.blob_writer() as writer:
                for start in range(0, len(data), MiB):
                    writer.write(data[start : start + MiB])
                writer.commit(Digest.of(data))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert visible_blobs(storage) == [(Digest.of(data), len(data))]


def test_a_committed_writer_is_closed(storage: Any) -> None:
    with storage.blob_writer() as writer:
        writer.write(b"x")
        writer.commit(Digest.of(b"x"))
        with pytest.raises(ValueError, match="committed"):
            writer.write(b"y")
        with pytest.raises(ValueError, match="committed"):
            writer.commit(Digest.of(b"x"))
    assert read_all(storage, Digest.of(b"x")) == b"x"


def test_delete_blob(storage: Any) -> None:
    keep, drop = storage.put_blob(b"keep"), storage.put_blob(b"drop")
    storage.delete_blob(drop)
    assert storage.blob_size(drop) is None
    with pytest.raises(NotFound):
        storage.open_blob(drop)
    assert visible_blobs(storage) == [(keep, 4)]


def test_list_blobs_gives_sizes_and_mtimes(storage: Any) -> None:
    digests = {storage.put_blob(payload(size, seed=size)): size for size in (1, 10, 1000)}
    listed = list(storage.list_blobs())
    assert sorted((d, s) for d, s, _ in listed) == sorted(digests.items())
    for _, _, mtime in listed:
        assert abs(mtime - time.time()) < 300


# metadata


def test_metadata_write_read_replace_delete(storage: Any) -> None:
    key = "tags/shell/latest"
    assert storage.read(key) is None
    storage.write(key, b"sha256:aaa")
    assert storage.read(key) == b"sha256:aaa"
    storage.write(key, b"sha256:bbb")
    assert storage.read(key) == b"sha256:bbb"
    storage.delete(key)
    assert storage.read(key) is None
    storage.delete(key)  # absent is fine


def test_metadata_is_bytes_exact(storage: Any) -> None:
    data = payload(MiB) + b"\0\xff\n"
    storage.write("builds/0123abcd", data)
    assert storage.read("builds/0123abcd") == data
    storage.write("builds/empty", b"")
    assert storage.read("builds/empty") == b""


def test_list_is_sorted_and_prefix_filtered(storage: Any) -> None:
    keys = [
        "tags/shell/latest",
        "tags/shell/git/latest",
        "tags/shell2/v1",
        "tags/a/b/c/d",
        "layers/f00d",
        "builds/beef",
        "gc/state",
    ]
    for key in reversed(keys):
        storage.write(key, key.encode())
    storage.put_blob(b"a blob is not a key")

    assert list(storage.list("tags/")) == sorted(k for k in keys if k.startswith("tags/"))
    assert list(storage.list("tags/shell/")) == ["tags/shell/git/latest", "tags/shell/latest"]
    # A plain string prefix, as in GCS: "tags/shell" also matches "tags/shell2/…".
    assert list(storage.list("tags/shell")) == [
        "tags/shell/git/latest",
        "tags/shell/latest",
        "tags/shell2/v1",
    ]
    assert list(storage.list("tags/shell/l")) == ["tags/shell/latest"]
    assert list(storage.list("layers/")) == ["layers/f00d"]
    assert list(storage.list("builds/nothing")) == []
    storage.delete("gc/state")
    assert list(storage.list("gc/")) == []


HOSTILE_KEYS = [
    "../x",
    "tags//a",
    "/abs",
    "/tags/a",
    "tags/a/../../b",
    "tags/./a",
    "tags/a\0b",
    "tags/" + "a" * 1100,
    "tags/a/",
    "tags",
    "tags/.hidden",
    "tags/a b",
    "tags\\a",
    "blobs/sha256/" + "0" * 64,  # blobs go through the blob API only
    "uploads/x",
    "",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_rejected(storage: Any, key: str) -> None:
    with pytest.raises(InvalidInput):
        storage.write(key, b"x")
    with pytest.raises(InvalidInput):
        storage.read(key)
    with pytest.raises(InvalidInput):
        storage.delete(key)


@pytest.mark.parametrize(
    "prefix", ["", "../", "tags/../", "/tags/", "tags//", "tags", "blobs/", "tags/a\0", "tmp/"]
)
def test_hostile_prefixes_are_rejected(storage: Any, prefix: str) -> None:
    with pytest.raises(InvalidInput):
        list(storage.list(prefix))


# debris of writers in progress or crashed


def test_listing_and_reads_ignore_temp_and_stray_objects(backend: Backend) -> None:
    storage = backend.storage
    storage.write("tags/app/latest", b"sha256:1")
    kept = storage.put_blob(b"kept")
    debris = {
        backend.temp_prefix + "blob-crashed": b"half a layer",
        backend.temp_prefix + "meta-crashed": b"half a tag",
        "blobs/sha256/not-a-digest": b"?",
        "blobs/sha256/" + "A" * 64: b"?",  # upper case: not a digest we write
        "tags/app/.latest.tmp": b"?",
        "tags/app/latest~": b"?",
    }
    for name, data in debris.items():
        backend.plant(name, data)

    with storage.blob_writer() as writer:  # a writer in progress, past one GCS chunk
        writer.write(payload(2 * GCS_CHUNK + 1))
        assert visible_blobs(storage) == [(kept, 4)]
        assert list(storage.list("tags/")) == ["tags/app/latest"]

    assert visible_blobs(storage) == [(kept, 4)]
    assert list(storage.list("tags/")) == ["tags/app/latest"]
    assert storage.read("tags/app/latest") == b"sha256:1"
    assert sorted(set(backend.raw_names()) - set(debris)) == [
        blob_key(kept),
        "tags/app/latest",
    ]


def test_write_unless_keeps_what_keep_protects(storage: Any) -> None:
    key = "builds/k"
    assert storage.write_unless(key, b"first", lambda _current: False)
    assert storage.read(key) == b"first"
    assert not storage.write_unless(key, b"second", lambda current: current == b"first")
    assert storage.read(key) == b"first"
    assert storage.write_unless(key, b"third", lambda current: current == b"other")
    assert storage.read(key) == b"third"


def test_write_unless_never_loses_a_protected_value_to_a_racing_writer(storage: Any) -> None:
    """Many writers at once, half of them protected values: once one is stored, none of the
    unprotected writes replaces it (a build's success and its failures)."""
    key = "builds/race"
    start = threading.Barrier(8)

    def writer(n: int) -> None:
        start.wait()
        value = b"success-%d" % n if n % 2 else b"failure-%d" % n
        storage.write_unless(key, value, lambda current: current.startswith(b"success"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert storage.read(key).startswith(b"success")
