"""Builds from a real binary cache into a builder whose Nix store is empty (issue 15).

The cache is the offline package set copied with ``nix copy``, signed with a key of
``nix-store --generate-binary-cache-key`` and served over HTTP; each build runs with a fresh
tmpfs over ``/nix`` (``cachesupport.empty_store_niximage``). The layers come from the NARs,
packed with no store write, and must be the warm store's to the byte: the same manifest
digests. What was downloaded is counted by the builder and, independently, by the server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from niximage_builder.binarycache import nixbase32
from tests.binarycache.cachesupport import (
    Key,
    build_json,
    bumped_package_set,
    closure_paths,
    copy_to_cache,
    empty_store_niximage,
    nar_sizes,
    require_empty_store,
    serve,
)
from testsupport import niximage, niximage_json, require

pytestmark = [pytest.mark.nix, pytest.mark.root]
IMAGES = {"jq": ["jq"], "python3": ["python3"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Warm-store builds of the images, and a signed cache of their closures, served."""
    require_empty_store()
    base = tmp_path_factory.mktemp("cache")
    warm = base / "warm-storage"
    results = {
        name: niximage_json("build", *packages, "--storage", str(warm))
        for name, packages in IMAGES.items()
    }
    key = Key(base)
    paths = sorted({p for r in results.values() for p in closure_paths(r)})
    copy_to_cache(base / "cache", paths, "zstd", key)
    return {"base": base, "warm": results, "key": key, "paths": paths}


def _cache_args(url: str, key: Key) -> list[str]:
    return ["--substituter", url, "--trusted-public-key", key.public]


def _run_image(storage: Path, ref: str, argv: list[str], work: Path) -> str:
    require("umoci", "chroot")
    layout, bundle = work / "oci", work / "bundle"
    niximage("export", ref, str(layout), "--storage", str(storage))
    tag = ref.rpartition(":")[2]
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], check=True,
        capture_output=True,
    )  # fmt: skip
    chroot = shutil.which("chroot")
    assert chroot is not None
    return subprocess.run(
        [chroot, str(bundle / "rootfs"), *argv], check=True,
        capture_output=True, text=True, env={"PATH": "/bin"},
    ).stdout  # fmt: skip


def test_images_from_the_cache_are_the_warm_stores_and_run(
    world: dict[str, Any], tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    with serve(world["base"] / "cache") as server:
        for name, packages in IMAGES.items():
            before = len(server.nar_requests())
            result = build_json(
                empty_store_niximage(
                    "build", *packages, "--storage", str(storage), "--tag", f"cache/{name}:1",
                    *_cache_args(server.url, world["key"]),
                )
            )  # fmt: skip
            assert result["manifestDigest"] == world["warm"][name]["manifestDigest"]
            assert result["derivationsBuilt"] == 0 and result["narsDownloaded"] > 0
            # The server sent each NAR once, and the builder counted what it sent.
            nars = server.nar_requests()[before:]
            assert len(nars) == len(set(nars)) == result["narsDownloaded"]
    assert "jq-1." in _run_image(storage, "cache/jq:1", ["/bin/jq", "--version"], tmp_path / "jq")
    out = _run_image(
        storage, "cache/python3:1", ["/bin/python3", "-c", "print(6*7)"], tmp_path / "py"
    )
    assert out.strip() == "42"


def test_a_rebuild_whose_layers_are_stored_downloads_no_nar(
    world: dict[str, Any], tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    with serve(world["base"] / "cache") as server:
        args = [
            "build",
            "python3",
            "--storage",
            str(storage),
            *_cache_args(server.url, world["key"]),
        ]
        first = build_json(empty_store_niximage(*args))
        before = len(server.nar_requests())
        again = build_json(empty_store_niximage(*args, "--rebuild"))
        assert server.nar_requests()[before:] == []
    assert first["narsDownloaded"] > 0
    assert again["manifestDigest"] == first["manifestDigest"]
    assert (again["narsDownloaded"], again["narBytesDownloaded"], again["bytesDownloaded"]) == (
        0,
        0,
        0,
    )
    assert all(layer["reused"] for layer in again["layers"])
    assert again["timings"]["total"] < 30


def _new_layers_nar_bytes(result: dict[str, Any]) -> int:
    """NAR bytes of the layers a build packed (not reused), the top layer aside."""
    return sum(
        layer["narSize"]
        for layer in result["layers"]
        if not layer["reused"] and layer["paths"] != ["<top>"]
    )


@pytest.mark.parametrize("package", ["python3", "jq"])
def test_after_one_application_changes_only_its_nar_is_downloaded(
    world: dict[str, Any], tmp_path: Path, package: str
) -> None:
    """python3 has a layer of its own: its NAR alone is fetched. jq is small, so it
    shares a small layer (with iana-etc): that layer's NARs are fetched, and nothing for
    the new top layer (the unchanged roots' listings are in storage)."""
    storage = tmp_path / "storage"
    bumped = bumped_package_set(tmp_path / "bumped", package)
    new = subprocess.run(
        ["nix-build", str(bumped), "-A", package, "--no-out-link"],
        capture_output=True, text=True, check=True,
    ).stdout.split()[-1]  # fmt: skip
    copy_to_cache(world["base"] / "cache", [new], "zstd", world["key"])
    with serve(world["base"] / "cache") as server:
        cache = _cache_args(server.url, world["key"])
        old = build_json(empty_store_niximage("build", package, "--storage", str(storage), *cache))
        result = build_json(
            empty_store_niximage(
                "build", package, "--storage", str(storage), "--package-source",
                f"path:{bumped}", *cache,
            )
        )  # fmt: skip
    changed = sorted(set(closure_paths(result)) - set(closure_paths(old)))
    assert changed == [new]
    changed_bytes = sum(nar_sizes(changed).values())
    assert result["narBytesDownloaded"] == _new_layers_nar_bytes(result)
    if package == "python3":
        assert result["narBytesDownloaded"] <= 1.05 * changed_bytes
        assert result["bytesDownloaded"] <= 1.05 * changed_bytes
    print(f"{package}: NAR bytes downloaded / changed: "
          f"{result['narBytesDownloaded'] / changed_bytes:.3f}, "
          f"served / changed: {result['bytesDownloaded'] / changed_bytes:.3f}")  # fmt: skip


def test_a_package_no_cache_has_is_built_by_nix_and_counted(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """jq is left out of a second cache: Nix builds it (and what it needs that the cache
    lacks), substituting the rest; the image is the same."""
    partial = world["base"] / "partial"
    jq_paths = set(closure_paths(world["warm"]["jq"]))
    python_only = sorted(
        set(closure_paths(world["warm"]["python3"])) - {p for p in jq_paths if p.endswith("-jq")}
    )
    copy_to_cache(partial, python_only, "xz", world["key"])
    with serve(partial) as server:
        result = build_json(
            empty_store_niximage(
                "build",
                "jq",
                "--storage",
                str(tmp_path / "s"),
                *_cache_args(server.url, world["key"]),
            )
        )
    assert result["manifestDigest"] == world["warm"]["jq"]["manifestDigest"]
    assert result["derivationsBuilt"] >= 1


def _corrupt_copy(world: dict[str, Any], folder: Path) -> tuple[Path, str]:
    """A cache of jq's closure whose jq NAR has one byte changed, with FileHash and
    FileSize rewritten to match (only the signed NarHash can tell)."""
    (jq,) = [p for p in closure_paths(world["warm"]["jq"]) if p.endswith("-jq")]
    copy_to_cache(folder, [jq], "none", world["key"])
    narinfo = folder / f"{jq.rpartition('/')[2][:32]}.narinfo"
    fields = dict(line.split(": ", 1) for line in narinfo.read_text().splitlines() if line)
    nar = folder / fields["URL"]
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 0x01
    nar.write_bytes(bytes(data))
    fields["FileHash"] = "sha256:" + nixbase32.encode(hashlib.sha256(data).digest())
    text = "".join(f"{k}: {v}\n" for k, v in fields.items())
    narinfo.write_text(text)
    return folder, jq


@pytest.mark.parametrize("fault", ["corrupt NAR", "unsigned", "unreachable"])
def test_a_bad_cache_is_a_precise_error_and_publishes_nothing(
    world: dict[str, Any], tmp_path: Path, fault: str
) -> None:
    storage = tmp_path / "storage"
    key = world["key"]
    if fault == "corrupt NAR":
        folder, _ = _corrupt_copy(world, tmp_path / "corrupt")
        kind, message = "CorruptCache", "the NAR's sha256 is not the signed NarHash"
    elif fault == "unsigned":
        folder = tmp_path / "unsigned"
        copy_to_cache(folder, closure_paths(world["warm"]["jq"]), "xz", None)
        kind, message = "UntrustedPath", "is not signed; trusted keys: niximage-test-1"
    else:
        folder = tmp_path / "empty"
        folder.mkdir()
        kind, message = "CacheUnreachable", "is unreachable"
    with serve(folder) as server:
        url = "http://127.0.0.1:9" if fault == "unreachable" else server.url
        proc = empty_store_niximage(
            "build", "jq", "--storage", str(storage), "--tag", "bad/jq:1",
            "--substituter", url, "--trusted-public-key", key.public,
        )  # fmt: skip
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (storage / "tags").exists()
    (record,) = (storage / "builds").iterdir()
    failure = json.loads(record.read_text())
    assert failure["ok"] is False and failure["error"]["kind"] == kind
