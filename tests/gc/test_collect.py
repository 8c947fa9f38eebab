"""gc over synthetic stores, on both backends: what is marked, what goes, what stays."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from niximage_core import gc, layout
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, StorageError
from niximage_core.result import BuildError, BuildResult
from tests.gc.conftest import Store, backdate
from tests.gc.support import Gate, Worker, blob_bytes, put_image, put_index, result_for


def blobs(store: Store) -> set[Digest]:
    return {d for d, _size, _mtime in store.storage.list_blobs()}


def test_only_blobs_of_the_untagged_image_go(store: Store) -> None:
    kept = put_image(store.storage, ["base", "app"], tag=("a/one", "1"))
    gone = put_image(store.storage, ["base", "other"], tag=("a/two", "1"))
    store.storage.delete(layout.tag_path("a/two", "1"))
    store.age()
    report = store.collect()
    only_gone = gone.digests - kept.digests
    assert set(report.blobs) == only_gone
    assert report.bytes == sum(gone.sizes[d] for d in only_gone)
    assert blobs(store) == kept.digests
    assert layout.read_tag(store.storage, "a/one", "1") == kept.manifest
    # Their layers/ entries went with them; the kept image's stayed.
    assert len(report.layers) == 1 and len(list(store.storage.list("layers/"))) == 2


def test_dry_run_lists_and_deletes_nothing(store: Store) -> None:
    put_image(store.storage, ["base"], tag=("a/one", "1"))
    gone = put_image(store.storage, ["x", "y"])
    before = store.backend.raw_names()
    store.age()
    report = store.collect(dry_run=True)
    assert report.dry_run and set(report.blobs) == gone.digests
    assert report.bytes == sum(gone.sizes.values()) and len(report.layers) == 2
    assert store.backend.raw_names() == before
    text = report.render()
    assert "would delete: 4 blobs" in text and all(str(d) in text for d in gone.digests)


def test_young_blobs_stay_whatever_references_them(store: Store) -> None:
    old = put_image(store.storage, ["old"])
    store.age()
    young = put_image(store.storage, ["young"])
    report = store.collect()
    assert set(report.blobs) == old.digests
    assert blobs(store) == young.digests


def test_recent_build_results_are_roots_until_they_age(store: Store) -> None:
    image = put_image(store.storage, ["l1", "l2"], build_key="k" * 64)
    store.age()
    # The result is recent while its manifest is: a build just wrote or reused it.
    assert gc.touch_blob(store.storage, image.manifest) is not None
    report = store.collect()
    assert report.recent_builds == 1 and not report.blobs and not report.builds
    store.age()
    report = store.collect()
    assert report.builds == ["builds/" + "k" * 64]
    assert set(report.blobs) == image.digests and not blobs(store)


def test_results_of_tagged_images_and_failures_stay(store: Store) -> None:
    image = put_image(store.storage, ["l1"], tag=("a/one", "1"), build_key="a" * 64)
    failed = BuildResult(
        buildKey="b" * 64,
        spec={},
        ok=False,
        error=BuildError(kind="MissingPackages", message="nope", missingPackages=["nope"]),
    )
    store.storage.write("builds/" + "b" * 64, failed.to_json())
    store.age()
    report = store.collect()
    assert not report.builds and not report.blobs
    assert sorted(store.storage.list("builds/")) == ["builds/" + "a" * 64, "builds/" + "b" * 64]
    assert blobs(store) == image.digests


def test_an_index_keeps_the_manifests_it_lists(store: Store) -> None:
    amd = put_image(store.storage, ["amd"])
    arm = put_image(store.storage, ["arm"])
    stray = put_image(store.storage, ["stray"])
    index = put_index(store.storage, [amd.manifest, arm.manifest])
    store.storage.write(layout.tag_path("multi", "1"), str(index).encode())
    store.age()
    report = store.collect()
    assert set(report.blobs) == stray.digests
    assert blobs(store) == amd.digests | arm.digests | {index}


def test_layer_entries_whose_blob_is_gone_are_dropped(store: Store) -> None:
    put_image(store.storage, ["kept"], tag=("a/one", "1"))
    missing = Digest.of(b"never stored")
    store.storage.write("layers/" + "c" * 64, json.dumps({"digest": str(missing)}).encode())
    store.storage.write("layers/" + "d" * 64, b"not json")
    store.age()
    report = store.collect()
    assert report.layers == ["layers/" + "c" * 64, "layers/" + "d" * 64]
    assert len(list(store.storage.list("layers/"))) == 1


def test_a_live_lease_protects_an_expired_one_does_not(store: Store) -> None:
    leased = put_image(store.storage, ["leased"])
    unleased = put_image(store.storage, ["unleased"])
    expired = {"refreshed": time.time() - 7200, "ttl": 60, "digests": [str(unleased.manifest)]}
    store.storage.write("gc/leases/" + "e" * 32, json.dumps(expired).encode())
    store.storage.write("gc/leases/" + "f" * 32, b"garbage")
    store.age()
    with gc.Lease(store.storage, "test") as lease:
        lease.add(*leased.digests)
        lease.flush()
        report = store.collect()
        assert report.live_leases == 1
        assert set(report.blobs) == unleased.digests and blobs(store) == leased.digests
        assert report.leases == ["gc/leases/" + "e" * 32, "gc/leases/" + "f" * 32]
        assert list(store.storage.list("gc/leases/")) == [lease.key]
    assert not list(store.storage.list("gc/leases/"))  # released


def test_lease_refreshes_and_flushes_in_the_background(store: Store) -> None:
    digest = Digest.of(b"x")
    with gc.Lease(store.storage, "test", ttl=0.2, flush=0.02) as lease:
        first = gc.LeaseRecord.parse(lease.key, store.storage.read(lease.key))
        lease.add(digest)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            record = gc.LeaseRecord.parse(lease.key, store.storage.read(lease.key))
            if digest in record.digests and record.refreshed > first.refreshed + 0.05:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the lease was neither flushed nor refreshed")
        assert record.purpose == "test" and record.live(time.time())


def test_stale_uploads_go(store: Store) -> None:
    store.backend.plant(store.backend.temp_prefix + "crashed-writer", b"partial")
    store.age()
    assert store.collect(dry_run=True).uploads == 1
    assert store.collect().uploads == 1
    assert not [n for n in store.backend.raw_names() if n.startswith(store.backend.temp_prefix)]


def test_a_tag_naming_a_missing_manifest_is_reported(store: Store) -> None:
    ghost = Digest.of(b"ghost")
    store.storage.write(layout.tag_path("a/ghost", "1"), str(ghost).encode())
    store.storage.write(layout.tag_path("a/bad", "1"), b"not a digest")
    broken = put_image(store.storage, ["x", "y"], tag=("a/broken", "1"))
    store.storage.delete_blob(broken.layers[1])
    report = store.collect()
    assert report.dangling == [
        f"tags/a/broken/_tags/1: {broken.manifest} names missing {broken.layers[1]}",
        f"tags/a/ghost/_tags/1 names missing {ghost}",
    ]
    assert report.invalid == ["tags/a/bad/_tags/1"]


def test_touch_refreshes_and_reports_missing(store: Store) -> None:
    digest = store.storage.put_blob(b"hello")
    store.age()
    before = next(mtime for d, _s, mtime in store.storage.list_blobs() if d == digest)
    assert gc.touch_blob(store.storage, digest) == 5
    after = next(mtime for d, _s, mtime in store.storage.list_blobs() if d == digest)
    assert after > before and after >= time.time() - 60
    assert gc.touch_all(store.storage, [digest, Digest.of(b"nope")]) == [Digest.of(b"nope")]
    with store.storage.open_blob(digest) as stream:
        assert stream.read() == b"hello"


def test_delete_if_stale_keeps_fresh_blobs(store: Store) -> None:
    digest = store.storage.put_blob(b"hello")
    assert gc.delete_blob_if_stale(store.storage, digest, time.time() - 3600) == "fresh"
    assert gc.delete_blob_if_stale(store.storage, digest, time.time() + 60) == "deleted"
    assert gc.delete_blob_if_stale(store.storage, digest, time.time() + 60) == "missing"
    assert store.storage.blob_size(digest) is None


def test_touch_and_delete_are_atomic(store: Store, hooks: Any, no_gcs_shim: None) -> None:
    """A touch that lands while gc is between its check and its delete: either the touch
    waits and reports the blob missing (filesystem lock), or the delete fails (GCS
    metageneration precondition). Never a touch that succeeded on a blob that then goes."""
    if store.name == "gcs" and not _preconditions(store):
        pytest.skip("this fake-gcs-server ignores ifMetagenerationMatch on DELETE")
    digest = store.storage.put_blob(blob_bytes("atomic"))
    store.age()
    gate = Gate("gc.delete-checked")
    hooks(gate)
    deleting = Worker(lambda: gc.delete_blob_if_stale(store.storage, digest, time.time() - 1))
    deleting.start()
    gate.wait()
    touching = Worker(lambda: gc.touch_blob(store.storage, digest))
    touching.start()
    touching.join(0.3)
    gate.go.set()
    outcome, size = deleting.result(), touching.result()
    exists = store.storage.blob_size(digest) is not None
    assert (size is not None) == exists
    assert outcome == ("fresh" if exists else "deleted")


def _preconditions(store: Store) -> bool:
    from google.api_core import exceptions

    blob = store.storage._blob("gc/probe")
    blob.upload_from_string(b"x")
    try:
        blob.delete(if_metageneration_match=99)
    except exceptions.PreconditionFailed:
        return True
    return False


def test_a_root_written_while_gc_runs_is_seen_before_deleting(store: Store, hooks: Any) -> None:
    """G1: gc reads the roots again once its last read is grace/2 old."""
    image = put_image(store.storage, ["late"])
    store.age()
    grace = 0.4 if store.name == "filesystem" else store.grace
    gate = Gate("gc.marked")
    hooks(gate)
    collecting = Worker(lambda: gc.collect(store.storage, grace))
    collecting.start()
    gate.wait()
    store.storage.write(layout.tag_path("a/late", "1"), str(image.manifest).encode())
    time.sleep(grace / 2 + 0.05)
    gate.go.set()
    report = collecting.result()
    assert not report.blobs and set(report.spared) == image.digests
    assert blobs(store) == image.digests


def test_a_missing_manifest_is_looked_up_again(store: Store) -> None:
    """A build may put a vanished manifest back between two markings of one gc run."""
    image = put_image(store.storage, ["a"])
    with store.storage.open_blob(image.manifest) as stream:
        data = stream.read()
    store.storage.delete_blob(image.manifest)
    marker = gc.Marker(store.storage)
    assert marker.references(image.manifest) is None
    store.storage.put_blob(data)
    refs = marker.references(image.manifest)
    assert refs is not None and set(refs.blobs) == {image.config, *image.layers}


def test_a_result_with_a_malformed_digest_is_reported_not_fatal(store: Store) -> None:
    bad = BuildResult(buildKey="k", spec={}, ok=True, manifestDigest="sha256:nope")
    store.storage.write("builds/" + "9" * 64, bad.to_json())
    garbage = put_image(store.storage, ["g"])
    store.age()
    report = store.collect()
    assert report.invalid == ["builds/" + "9" * 64] and set(report.blobs) == garbage.digests


def test_grace_must_be_positive(store: Store) -> None:
    with pytest.raises(InvalidInput):
        gc.collect(store.storage, 0)


def test_a_read_error_aborts_before_deleting(tmp_path: Path, monkeypatch: Any) -> None:
    from niximage_core.storage.filesystem import FilesystemStorage

    storage = FilesystemStorage(tmp_path / "s")
    put_image(storage, ["kept"], tag=("a/one", "1"))
    put_image(storage, ["garbage"])
    backdate(storage.root)

    def broken(_digest: Digest) -> Any:
        raise StorageError("disk on fire")

    monkeypatch.setattr(storage, "open_blob", broken)
    with pytest.raises(StorageError):
        gc.collect(storage, 3600)
    assert len({d for d, _s, _m in storage.list_blobs()}) == 6  # nothing deleted


def test_a_killed_gc_leaves_trash_that_the_next_run_settles(tmp_path: Path) -> None:
    from niximage_core.storage.filesystem import FilesystemStorage

    storage = FilesystemStorage(tmp_path / "s")
    fresh, stale = Digest.of(b"fresh"), Digest.of(b"stale")
    (storage.root / "tmp" / f"gc-{fresh.hex}.1").write_bytes(b"fresh")
    (storage.root / "tmp" / f"gc-{stale.hex}.2").write_bytes(b"stale")
    old = time.time() - 7200
    os.utime(storage.root / "tmp" / f"gc-{stale.hex}.2", (old, old))
    report = gc.collect(storage, 3600)
    assert report.restored == 1
    with storage.open_blob(fresh) as stream:
        assert stream.read() == b"fresh" and storage.blob_size(stale) is None
    assert not list((storage.root / "tmp").iterdir())


def test_result_digests_name_manifest_config_and_layers() -> None:
    image = put_image_free()
    result = result_for(image, "k")
    assert set(gc.result_digests(result)) == image.digests


def put_image_free() -> Any:
    from tests.gc.support import Image

    layers = (Digest.of(b"1"), Digest.of(b"2"))
    return Image(Digest.of(b"m"), Digest.of(b"c"), layers, dict.fromkeys(layers, 1))
