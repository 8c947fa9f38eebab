"""gc in a loop against builders in a loop, with random pauses at every checkpoint.

Two builders build images from random subsets of a small package pool (so layers are shared
and reused), tag them, delete tags, and after every step check that each of their tags names a
whole image. A collector runs gc back to back with a short grace period, so blobs turn old
while builds still use them. At the end every tag in the store must name a whole image.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from niximage_core import checkpoints, gc, layout
from niximage_core.digest import Digest
from niximage_core.errors import StorageError
from tests.gc.conftest import Store
from tests.gc.support import FakeNix, Worker, build_image, missing_blobs, result_blobs

POOL = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
SECONDS = 3.0


class Shaker:
    """A checkpoint hook that sleeps a little, at random, to shuffle the interleavings, and
    now and then stalls a build past the grace period (a paused builder)."""

    def __init__(self, seed: int, stall: float) -> None:
        self.random = random.Random(seed)
        self.stall = stall
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def __call__(self, name: str, info: Mapping[str, Any]) -> None:
        with self.lock:
            self.counts[name] += 1
            pause = self.random.random() * 0.004 if self.random.random() < 0.4 else 0.0
            # Not after the build recorded its result: that stall is the caller waiting past
            # the grace period before tagging, which test_concurrent_builds covers.
            if (
                name.startswith("build.")
                and name != "build.recorded"
                and self.random.random() < 0.03
            ):
                pause = self.stall
                self.counts["stalls"] += 1
        if name == "build.verified" and info["missing"]:
            with self.lock:
                self.counts["repaired"] += 1
        time.sleep(pause)


def builder(store: Store, nix: FakeNix, repo: str, seed: int, stop: threading.Event) -> Counter:
    rng = random.Random(seed)
    done: Counter[str] = Counter()
    while not stop.is_set():
        packages = rng.sample(POOL, 3)
        try:
            result = build_image(store.storage, nix, *packages, workers=2)
        except StorageError:
            done["failed"] += 1  # gc kept taking its blobs: verify gave up, nothing recorded
            continue
        # Claim 2: a returned result names only blobs that exist.
        assert all(store.storage.blob_size(d) is not None for d in result_blobs(result))
        done["builds"] += 1
        tag = rng.choice(["1", "2", "3"])
        try:
            layout.record_tag(store.storage, repo, tag, result)
            done["tags"] += 1
        except StorageError:
            done["refused"] += 1  # gc took a blob in between: the tag was not left dangling
        if rng.random() < 0.4:
            store.storage.delete(layout.tag_path(repo, rng.choice(["1", "2", "3"])))
        # Claim 1: while a tag names an image, the image is whole.
        for name in layout.list_tags(store.storage, repo):
            digest = layout.read_tag(store.storage, repo, name)
            assert digest is not None and not missing_blobs(store.storage, digest), (repo, name)
    return done


def collector(store: Store, grace: float, stop: threading.Event) -> Counter:
    done: Counter[str] = Counter()
    while not stop.is_set():
        try:
            report = gc.collect(store.storage, grace)
        except gc.GraceTooShort:
            done["aborted"] += 1  # a slow root read: rule G1 stops the run, deleting nothing
            continue
        done["runs"] += 1
        done["blobs"] += len(report.blobs)
        done["spared"] += len(report.spared)
        done["builds"] += len(report.builds)
    return done


@pytest.mark.parametrize("seed", [1])
def test_gc_and_builds_in_a_loop(
    store: Store, fake_nix: FakeNix, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Short enough that blobs age within a build; long enough for a root read (rule G1).
    grace = 0.3 if store.name == "filesystem" else 1.0
    shaker = Shaker(seed, stall=grace * 1.5)
    monkeypatch.setattr(checkpoints, "CHECKPOINT", shaker)
    # Garbage to start with (its own layers, and the two every image has).
    build_image(store.storage, fake_nix, "omega", "psi")
    stop = threading.Event()
    workers = [
        Worker(lambda: builder(store, fake_nix, "s/one", seed, stop), name="builder one"),
        Worker(lambda: builder(store, fake_nix, "s/two", seed + 1, stop), name="builder two"),
        Worker(lambda: collector(store, grace, stop), name="gc"),
    ]
    for worker in workers:
        worker.start()
    time.sleep(SECONDS)
    stop.set()
    one, two, collected = (worker.result(60) for worker in workers)
    for key in store.storage.list("tags/"):
        raw = store.storage.read(key)
        assert raw is not None
        assert not missing_blobs(store.storage, Digest.parse(raw.decode())), key
    # The loop really raced: images built and tagged, garbage collected, blobs spared or
    # repaired while builds used them.
    assert one["tags"] + two["tags"] >= 3, (one, two)
    assert collected["runs"] >= 3 and collected["blobs"] > 0, collected
    print(f"\n{store.name}: builders {one + two}, gc {collected}, hooks {shaker.counts}")
