"""The issue's example with real Nix and the real command line, on both backends: two images
from the offline package set, one tag deleted; ``niximage gc --dry-run`` lists exactly the
blobs only the untagged image used, and ``niximage gc`` deletes exactly those."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from typing import Any

import pytest

import niximage_cli as cli
from niximage_core import layout
from niximage_core.digest import Digest
from tests.gc.conftest import Store
from tests.gc.support import missing_blobs
from testsupport import ROOT, env, niximage, niximage_json, require

pytestmark = pytest.mark.nix


def gc_wired() -> bool:
    """Whether ``niximage gc`` exists yet (else ``python -m niximage_core.gc``)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        cli.build_parser().parse_args(["gc", "--dry-run"])
        return True
    return False


def niximage_gc(*args: str) -> subprocess.CompletedProcess[str]:
    if gc_wired():
        return niximage("gc", *args)
    proc = subprocess.run(
        [sys.executable, "-m", "niximage_core.gc", *args],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def image_blobs(result: dict[str, Any]) -> set[Digest]:
    """The image's blobs and its SBOM's."""
    named = [result["manifestDigest"], result["configDigest"]]
    named += [layer["digest"] for layer in result["layers"]]
    named += [d for ref in result["referrers"] for d in (ref["manifestDigest"], *ref["blobs"])]
    return {Digest.parse(d) for d in named}


def test_dry_run_lists_exactly_the_blobs_only_the_untagged_image_used(store: Store) -> None:
    require("nix-build")
    url = store.storage.url
    one = niximage_json("build", "bash", "jq", "--storage", url, "--tag", "a/one:1")
    two = niximage_json("build", "bash", "python3", "--storage", url, "--tag", "a/two:1")
    only_one = image_blobs(one) - image_blobs(two)
    assert image_blobs(one) & image_blobs(two), "the images share layers (bash, glibc)"
    store.storage.delete(layout.tag_path("a/one", "1"))
    store.age()
    # The default grace period (1 h) on the aged filesystem store; GCS ages for real.
    grace = [] if store.name == "filesystem" else ["--grace", f"{store.grace}s"]
    before = store.backend.raw_names()

    dry = json.loads(niximage_gc("--storage", url, "--dry-run", "--json", *grace).stdout)
    assert {Digest.parse(b["digest"]) for b in dry["blobs"]} == only_one
    sizes = {d: store.storage.blob_size(d) for d in only_one}
    assert dry["bytes"] == sum(size or 0 for size in sizes.values())
    assert dry["builds"] == [layout.build_key_path(one["buildKey"])]
    assert store.backend.raw_names() == before
    if store.name == "filesystem":  # the human summary (the same report; one backend will do)
        text = niximage_gc("--storage", url, "--dry-run").stdout
        assert f"would delete: {len(only_one)} blobs" in text
        assert all(str(digest) in text for digest in only_one)

    done = json.loads(niximage_gc("--storage", url, "--json", *grace).stdout)
    assert {Digest.parse(b["digest"]) for b in done["blobs"]} == only_one
    assert all(store.storage.blob_size(d) is None for d in only_one)
    assert not missing_blobs(store.storage, Digest.parse(two["manifestDigest"]))
    # Building the first image again packs only what gc took and reuses the rest.
    again = niximage_json("build", "bash", "jq", "--storage", url, "--rebuild")
    assert again["manifestDigest"] == one["manifestDigest"]
    reused = {Digest.parse(layer["digest"]) for layer in again["layers"] if layer["reused"]}
    layers = {Digest.parse(layer["digest"]) for layer in one["layers"]}
    assert reused == image_blobs(one) & image_blobs(two) & layers
