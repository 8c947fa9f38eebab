"""gc during builds, one ordering at a time (the doc of ``niximage_core.gc`` numbers them).

Image one (alpha, beta, gamma) was built and tagged, then its tag was deleted and its blobs
aged: they are garbage, except that build two (alpha, beta, delta) reuses most of them. The
real build pipeline runs on a fake Nix with one packing thread; gates at the protocol's
checkpoints stop the build or gc exactly where each ordering needs it. Some tests switch one
mechanism off to show that the other one alone suffices.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from niximage_core import gc, layout
from niximage_core.digest import Digest
from niximage_core.errors import StorageError
from niximage_core.result import BuildResult
from tests.gc.conftest import Store
from tests.gc.support import FakeNix, Gate, Worker, build_image, missing_blobs, result_blobs

TWO = ("alpha", "beta", "delta")


def old_untagged_image(store: Store, nix: FakeNix) -> BuildResult:
    one = build_image(store.storage, nix, "alpha", "beta", "gamma")
    layout.record_tag(store.storage, "a/one", "1", one)
    store.storage.delete(layout.tag_path("a/one", "1"))
    store.age()
    return one


def start_two(store: Store, nix: FakeNix) -> Worker:
    worker = Worker(lambda: build_image(store.storage, nix, *TWO), name="build two")
    worker.start()
    return worker


def assert_complete(store: Store, result: BuildResult) -> None:
    """The image is whole, and tagging it works."""
    assert not missing_blobs(store.storage, Digest.parse(result.manifestDigest or ""))
    layout.record_tag(store.storage, "a/two", "1", result)


def verify_passes(hooks: Any) -> list[list[Digest]]:
    return [info["missing"] for name, info in hooks.seen if name == "build.verified"]


def ignore_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc.LeaseRecord, "live", lambda _self, _now: False)


def test_gc_spares_what_a_running_build_leased(store: Store, fake_nix: FakeNix, hooks: Any) -> None:
    """Ordering 1: the lease alone (everything aged past the grace period while paused)."""
    one = old_untagged_image(store, fake_nix)
    gate = Gate("build.manifest-written")
    seen = hooks(gate)
    building = start_two(store, fake_nix)
    gate.wait()
    store.age()
    report = store.collect()
    gate.go.set()
    two = building.result()
    assert report.live_leases == 1
    assert set(report.blobs) == result_blobs(one) - result_blobs(two)
    assert report.builds == [layout.build_key_path(one.buildKey)]
    assert verify_passes(seen) == [[]]
    assert sum(layer.reused for layer in two.layers) == 4  # alpha, beta, cacert, iana-etc
    assert_complete(store, two)


def test_a_layer_deleted_before_the_build_touches_it_is_packed_again(
    store: Store, fake_nix: FakeNix, hooks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordering 2: gc read the (still empty) lease, then deleted a layer the build had just
    found in ``layers/``; the build's touch says missing, and it packs the layer again."""
    # The lease stays empty until the manifest.
    monkeypatch.setattr(gc.roots, "LEASE_FLUSH", 3600.0)
    one = old_untagged_image(store, fake_nix)
    gate = Gate("build.reuse")
    hooks(gate)
    building = start_two(store, fake_nix)
    gate.wait()
    report = store.collect()
    gate.go.set()
    two = building.result()
    assert set(report.blobs) == result_blobs(one)
    assert gate.info["digest"] in report.blobs
    assert not any(layer.reused for layer in two.layers)
    assert_complete(store, two)


def test_a_touch_racing_the_delete_never_leaves_a_hole(
    store: Store, fake_nix: FakeNix, hooks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordering 3: the build touches a layer after gc checked it and before gc deletes it.
    The filesystem's lock makes the touch wait and then see the blob gone; on GCS the delete's
    generation precondition fails. Either way the image ends up whole."""
    monkeypatch.setattr(gc.roots, "LEASE_FLUSH", 3600.0)
    old_untagged_image(store, fake_nix)
    reuse = Gate("build.reuse")
    checked = Gate("gc.delete-checked", lambda info: info["digest"] == reuse.info["digest"])
    hooks(reuse, checked)
    building = start_two(store, fake_nix)
    reuse.wait()
    collecting = Worker(store.collect, name="gc")
    collecting.start()
    checked.wait()
    reuse.go.set()  # the build touches the layer now
    time.sleep(0.2)
    checked.go.set()
    report, two = collecting.result(), building.result()
    digest = reuse.info["digest"]
    layer = next(layer for layer in two.layers if layer.digest == str(digest))
    assert (digest in report.blobs) == (not layer.reused)
    assert_complete(store, two)


def test_what_a_build_touched_is_fresh_without_any_lease(
    store: Store, fake_nix: FakeNix, hooks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordering 4: with leases ignored, the touches alone keep the reused layers."""
    ignore_leases(monkeypatch)
    one = old_untagged_image(store, fake_nix)
    gate = Gate("build.manifest-written")
    seen = hooks(gate)
    building = start_two(store, fake_nix)
    gate.wait()
    report = store.collect()
    gate.go.set()
    two = building.result()
    assert set(report.blobs) == result_blobs(one) - result_blobs(two)
    assert verify_passes(seen) == [[]]
    assert_complete(store, two)


def test_verify_puts_back_what_gc_took_before_anything_named_it(
    store: Store, fake_nix: FakeNix, hooks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordering 5: no lease, and the build paused past the grace period after writing its
    manifest: gc deletes all of it. The verify pass finds the holes and fills them."""
    ignore_leases(monkeypatch)
    old_untagged_image(store, fake_nix)
    gate = Gate("build.manifest-written")
    seen = hooks(gate)
    building = start_two(store, fake_nix)
    gate.wait()
    store.age()
    report = store.collect()
    assert gate.info["digest"] in report.blobs  # even the new manifest went
    gate.go.set()
    two = building.result()
    passes = verify_passes(seen)
    assert len(passes) == 2 and set(passes[0]) == result_blobs(two) and passes[1] == []
    assert_complete(store, two)


def test_a_tag_never_names_a_collected_blob(store: Store, fake_nix: FakeNix) -> None:
    """Ordering 6: the caller waited past the grace period before tagging; gc took the
    untagged result. ``record_tag`` notices, puts the old tag back and fails."""
    kept = build_image(store.storage, fake_nix, "alpha")
    layout.record_tag(store.storage, "a/app", "1", kept)
    two = build_image(store.storage, fake_nix, *TWO)
    store.age()
    report = store.collect()
    assert Digest.parse(two.manifestDigest or "") in report.blobs
    with pytest.raises(StorageError, match="garbage-collected"):
        layout.record_tag(store.storage, "a/app", "1", two)
    assert layout.read_tag(store.storage, "a/app", "1") == Digest.parse(kept.manifestDigest or "")
    with pytest.raises(StorageError):
        layout.record_tag(store.storage, "a/new", "1", two)
    assert layout.read_tag(store.storage, "a/new", "1") is None
    assert not missing_blobs(store.storage, Digest.parse(kept.manifestDigest or ""))


def test_a_refused_tag_is_put_back_only_if_the_old_image_is_whole(
    store: Store, fake_nix: FakeNix, hooks: Any
) -> None:
    """While ``record_tag`` had the tag name the new image, the old one was unreferenced, and
    a gc took it: putting the old value back would leave a dangling tag, so the tag goes."""
    kept = build_image(store.storage, fake_nix, "alpha")
    layout.record_tag(store.storage, "a/app", "1", kept)
    two = build_image(store.storage, fake_nix, *TWO)
    store.age()
    store.collect()  # takes the untagged image two
    gate = Gate("build.tagged")
    hooks(gate)
    tagging = Worker(lambda: layout.record_tag(store.storage, "a/app", "1", two))
    tagging.start()
    gate.wait()
    report = store.collect()  # the tag names two now: the old image is garbage
    assert Digest.parse(kept.manifestDigest or "") in report.blobs
    gate.go.set()
    with pytest.raises(StorageError):
        tagging.result()
    assert layout.read_tag(store.storage, "a/app", "1") is None


def test_a_cached_result_stays_whole_long_enough_to_be_tagged(
    store: Store, fake_nix: FakeNix
) -> None:
    """The operator's path: ``cached_result`` now, ``record_tag`` a moment later."""
    two = build_image(store.storage, fake_nix, *TWO)
    store.age()
    cached = layout.cached_result(store.storage, two.buildKey)
    assert cached is not None and cached.manifestDigest == two.manifestDigest
    report = store.collect()
    assert not set(report.blobs) & result_blobs(two)
    layout.record_tag(store.storage, "a/two", "1", cached)
    # Once gc took a layer, the cached result is no longer offered.
    layer = Digest.parse(two.layers[0].digest)
    store.storage.delete_blob(layer)
    assert layout.cached_result(store.storage, two.buildKey) is None
