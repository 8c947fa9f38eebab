"""``niximage build`` of the offline package set with real Nix, exported, unpacked with umoci
and run in a chroot: the image really works, and builds are reproducible and cached."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from testsupport import ROOT, niximage, niximage_json, require, require_root

pytestmark = pytest.mark.nix


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("nix-build")
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def first_build(store: Path) -> dict[str, Any]:
    return niximage_json(
        "build", "bash", "jq", "python3", "--storage", str(store), "--tag", "test/app:1"
    )


def test_plan_diamond_lists_the_four_paths_and_busybox() -> None:
    require("nix-build")
    doc = niximage_json("plan", "--json", "diamond-top")
    names = sorted(entry["path"].split("-", 1)[1] for entry in doc["closure"])
    assert [n for n in names if n.startswith("diamond-")] == [
        "diamond-bottom",
        "diamond-left",
        "diamond-right",
        "diamond-top",
    ]
    assert any(n.startswith("busybox") for n in names)
    top = next(e for e in doc["closure"] if e["path"].endswith("-diamond-top"))
    assert len(top["references"]) >= 2


def test_plan_reports_every_missing_package() -> None:
    require("nix-build")
    proc = niximage("plan", "jq", "nope", "python3.nope", check=False)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "python3.nope" in proc.stderr


def test_bad_name_exits_2_naming_it() -> None:
    proc = niximage("plan", "jq", "x${y}", check=False)
    assert proc.returncode == 2 and "x${y}" in proc.stderr


def test_build_result_describes_the_image(first_build: dict[str, Any], store: Path) -> None:
    assert first_build["ok"] and first_build["manifestDigest"].startswith("sha256:")
    assert first_build["bytesUploaded"] > 0
    layers = first_build["layers"]
    assert 2 <= len(layers) <= 95
    assert all(not layer["reused"] for layer in layers)
    assert set(first_build["timings"]) >= {"nixBuild", "layering", "packing", "total"}
    digest = first_build["manifestDigest"].split(":")[1]
    assert (store / "blobs" / "sha256" / digest).is_file()
    tag_file = store / "tags" / "test" / "app" / "_tags" / "1"
    assert tag_file.read_text() == first_build["manifestDigest"]


def test_export_unpack_and_run(first_build: dict[str, Any], store: Path, tmp_path: Path) -> None:
    require("umoci", "chroot")
    require_root()
    layout = tmp_path / "layout"
    niximage("export", "test/app:1", str(layout), "--storage", str(store))
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:1", str(bundle)], check=True, capture_output=True
    )
    rootfs = bundle / "rootfs"
    chroot = shutil.which("chroot")
    assert chroot is not None

    def run(command: str) -> str:
        return subprocess.run(
            [chroot, str(rootfs), "/bin/sh", "-c", command],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": "/bin"},
        ).stdout.strip()

    assert run("echo ok") == "ok"
    assert run("jq --version").startswith("jq-")
    assert run("python3 -c 'import ssl, sqlite3; print(ssl.OPENSSL_VERSION)'").startswith("OpenSSL")
    assert (rootfs / "etc/ssl/certs/ca-bundle.crt").exists()
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"] == ["bash"]


def test_rebuild_is_identical_and_uploads_nothing(first_build: dict[str, Any], store: Path) -> None:
    again = niximage_json("build", "python3", "jq", "bash", "--storage", str(store), "--rebuild")
    assert again["manifestDigest"] == first_build["manifestDigest"]
    assert again["bytesUploaded"] == 0
    assert all(layer["reused"] for layer in again["layers"])
    cached = niximage_json("build", "bash", "jq", "python3", "--storage", str(store))
    assert cached["cached"] and cached["manifestDigest"] == first_build["manifestDigest"]


def test_same_build_in_a_fresh_store_gives_the_same_digest(
    first_build: dict[str, Any], tmp_path: Path
) -> None:
    fresh = niximage_json("build", "bash", "jq", "python3", "--storage", str(tmp_path / "s"))
    assert fresh["manifestDigest"] == first_build["manifestDigest"]


def test_missing_packages_fail_the_build_with_exit_2(store: Path) -> None:
    proc = niximage("build", "jq", "nope", "--storage", str(store), check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_from_a_nix_image_file(store: Path) -> None:
    result = niximage_json(
        "build", "-f", str(ROOT / "examples" / "jq.yaml"), "--storage", str(store)
    )
    assert result["ok"]
    assert (store / "tags" / "jq" / "_tags" / "1.0").read_text() == result["manifestDigest"]
