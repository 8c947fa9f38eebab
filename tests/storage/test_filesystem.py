"""Filesystem backend specifics: paths for sendfile, durability, permissions, crash debris."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from niximage_core import layout
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, StorageError
from niximage_core.storage import filesystem, filesystem_write
from niximage_core.storage.filesystem import FilesystemStorage


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(tmp_path / "store")


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def dirs(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())


def test_layout(store: FilesystemStorage) -> None:
    digest = store.put_blob(b"blob")
    store.write("tags/shell/latest", b"sha256:1")
    assert files(store.root) == [f"blobs/sha256/{digest.hex}", "tags/shell/latest"]
    assert (store.root / "tmp").is_dir()
    assert store.url == str(store.root)


def test_relative_root_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert FilesystemStorage("rel").url == str(tmp_path / "rel")


def test_blob_file_is_the_committed_path(store: FilesystemStorage) -> None:
    digest = store.put_blob(b"for sendfile")
    path = store.blob_file(digest)
    assert path is not None
    assert Path(path).read_bytes() == b"for sendfile"
    assert store.blob_file(Digest.of(b"absent")) is None


def test_files_are_readable_by_other_users(store: FilesystemStorage) -> None:
    # The registry sidecar may run as another uid than the builder.
    digest = store.put_blob(b"blob")
    store.write("builds/abc", b"{}")
    for path in (store.root / "blobs/sha256" / digest.hex, store.root / "builds/abc"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_commit_syncs_the_file_then_the_directory(
    store: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        published = any((store.root / name).exists() for name in published_names)
        synced.append(f"{kind}{'-after-rename' if published else ''}")
        real_fsync(fd)

    monkeypatch.setattr(filesystem.os, "fsync", fsync)
    published_names = [f"blobs/sha256/{Digest.of(b'durable').hex}"]
    store.put_blob(b"durable")
    assert synced == ["file", "dir-after-rename"]
    synced.clear()
    published_names = ["tags/a/b"]
    store.write("tags/a/b", b"x")
    assert synced == ["file", "dir-after-rename"]


def test_failed_rename_leaves_nothing(
    store: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write("tags/a/b", b"old")

    def replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem.os, "replace", replace)
    with pytest.raises(StorageError, match="No space left on device"):
        store.put_blob(b"blob")
    with pytest.raises(StorageError, match="No space left on device"):
        store.write("tags/a/b", b"new")
    monkeypatch.undo()
    assert store.read("tags/a/b") == b"old"
    assert list(store.list_blobs()) == []
    assert files(store.root) == ["tags/a/b"]  # no temp files either


def test_purge_stale_uploads(store: FilesystemStorage) -> None:
    old, fresh = store.root / "tmp/blob-crashed", store.root / "tmp/blob-live"
    old.write_bytes(b"half a layer")
    fresh.write_bytes(b"being written")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert store.purge_stale_uploads(older_than=600) == 1
    assert not old.exists() and fresh.exists()


def test_key_that_is_a_prefix_of_another_key(store: FilesystemStorage) -> None:
    # A directory cannot also be a file: say so instead of failing obscurely.
    store.write("tags/shell/git", b"x")
    with pytest.raises(InvalidInput, match="clashes"):
        store.write("tags/shell/git/latest", b"y")
    store.write("tags/web/app/latest", b"z")
    with pytest.raises(InvalidInput, match="clashes"):
        store.write("tags/web/app", b"w")
    assert store.read("tags/web/app") is None  # a prefix is not a key
    store.delete("tags/web/app")  # nor deletable, quietly
    assert list(store.list("tags/")) == ["tags/shell/git", "tags/web/app/latest"]
    assert list(store.list("tags/shell/git/")) == []
    assert store.read("tags/shell/git/latest") is None


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot create storage directory"):
        FilesystemStorage(tmp_path / "file")


def test_read_only_store_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The registry may mount a store read-only before any builder wrote to it.
    root = tmp_path / "ro"
    root.mkdir()

    def mkdir(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    store = FilesystemStorage(root)
    monkeypatch.undo()
    assert store.blob_size(Digest.of(b"x")) is None
    assert list(store.list_blobs()) == []
    assert list(store.list("tags/")) == []
    with pytest.raises(StorageError, match="tmp"):
        store.put_blob(b"x")


def test_deleting_tags_leaves_no_empty_directories(store: FilesystemStorage) -> None:
    app, api = layout.tag_path("team/web/app", "1.0"), layout.tag_path("team/web/api", "latest")
    store.write(app, b"sha256:1")
    store.write(api, b"sha256:2")
    store.write("builds/abc", b"{}")
    store.delete(app)
    # Only what the other tag still needs stays.
    assert dirs(store.root / "tags") == ["team", "team/web", "team/web/api", "team/web/api/_tags"]
    store.delete(api)
    store.delete("builds/abc")
    assert dirs(store.root / "tags") == []
    assert (store.root / "tags").is_dir() and (store.root / "builds").is_dir()
    store.delete(app)  # deleting a missing key is still fine
    store.write(app, b"sha256:3")  # and the directories come back with the next tag
    assert layout.list_tags(store, "team/web/app") == ["1.0"]


def test_a_directory_pruned_before_the_rename_is_made_again(
    store: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete in the same directory (of a key already gone) empties it and prunes it up
    to tags/ between the writer's mkdir and its rename: the writer makes it again."""
    key = layout.tag_path("a/b", "1")
    real_replace = os.replace
    pruned: list[object] = []

    def replace(src: str, dst: str) -> None:
        if not pruned:
            store.delete(layout.tag_path("a/b", "other"))
            pruned.append(dst)
            assert not (store.root / "tags/a").exists()
        real_replace(src, dst)

    monkeypatch.setattr(filesystem_write.os, "replace", replace)
    store.write(key, b"x")
    assert pruned and store.read(key) == b"x"
    assert files(store.root) == [key]  # no temp file left either


def test_a_parent_pruned_during_mkdir_is_made_again(
    store: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkdir -p makes tags/a/b, then tags/a/b/_tags: a delete may prune tags/a/b between."""
    real_mkdir = os.mkdir
    pruned: list[str] = []

    def mkdir(path: str | os.PathLike[str], mode: int = 0o777) -> None:
        parent = os.path.dirname(os.fspath(path))
        if os.fspath(path).endswith("/_tags") and os.path.isdir(parent) and not pruned:
            store.delete(layout.tag_path("a/b", "other"))
            pruned.append(parent)
        real_mkdir(path, mode)

    monkeypatch.setattr(filesystem.os, "mkdir", mkdir)
    store.write(layout.tag_path("a/b", "1"), b"x")
    assert pruned and store.read(layout.tag_path("a/b", "1")) == b"x"


def test_concurrent_writes_and_deletes_in_one_directory_lose_nothing(
    store: FilesystemStorage,
) -> None:
    """A writer keeps writing tags into a directory that a deleter keeps emptying and
    pruning: no write fails, and every written tag is there until its own delete."""
    repository = "race/deep/repo"
    rounds = 300
    errors: list[BaseException] = []
    lost: list[str] = []
    start = threading.Barrier(2)

    def writer() -> None:
        start.wait()
        for i in range(rounds):
            key = layout.tag_path(repository, f"w{i}")
            try:
                store.write(key, b"%d" % i)
                if store.read(key) != b"%d" % i:
                    lost.append(key)
                store.delete(key)  # empty again: the next write races a prune
            except Exception as exc:  # reported below, in the test's thread
                errors.append(exc)

    def deleter() -> None:
        start.wait()
        for _ in range(rounds):
            try:
                store.write(layout.tag_path(repository, "d"), b"d")
                store.delete(layout.tag_path(repository, "d"))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=deleter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == [] and lost == []
    assert files(store.root) == [] and dirs(store.root / "tags") == []


def test_a_directory_pruned_while_mkdir_checks_it_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pathlib's ``mkdir(exist_ok=True)`` answers "exists" and then checks ``is_dir``; a
    delete that prunes the directory in between must not pass for a clashing key."""
    store = FilesystemStorage(tmp_path / "store")
    store.write("gc/leases/first", b"1")
    store.delete("gc/leases/first")  # gc/leases/ is pruned
    real_mkdir = Path.mkdir
    raced = []

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == "leases" and not raced:
            raced.append(self)
            raise FileExistsError(17, "File exists", str(self))  # pruned right after
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    store.write("gc/leases/second", b"2")
    assert raced and store.read("gc/leases/second") == b"2"


def test_a_big_blob_reaches_the_disk_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Background fdatasync every WRITEBACK_BYTES: the fsync at commit finds little left.
    The blob is whole and verified as ever; its digest is the writer's own hash."""
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    store = FilesystemStorage(tmp_path / "store")
    piece = bytes(range(256)) * 4096  # 1 MiB
    count = 3 * filesystem_write.WRITEBACK_BYTES // len(piece) + 1
    with store.blob_writer() as writer:
        for _ in range(count):
            writer.write(piece)
        expected = Digest.of(piece * count)
        assert writer.digest() == expected
        writer.commit(expected)
    assert len(synced) >= 2
    with store.open_blob(expected) as stream:
        assert Digest.of(stream.read()) == expected


def test_a_discarded_big_blob_waits_for_its_background_sync(tmp_path: Path) -> None:
    store = FilesystemStorage(tmp_path / "store")
    with pytest.raises(RuntimeError), store.blob_writer() as writer:
        writer.write(bytes(filesystem_write.WRITEBACK_BYTES + 1))
        raise RuntimeError("the packer failed")
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
