"""The top layer's symlink forest: merged directories, links to absolute store paths, first
root wins, tmp/ and usr/bin/env. Roots are fake store paths in tmp_path."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from niximage_builder.tarball import Entry, PackError
from niximage_builder.toplayer import forest_entries, pack_top_layer


def _package(root: Path, files: dict[str, str | bytes]) -> str:
    """A fake store path: ``{"bin/x": b"content", "bin/y": "->target"}`` (str = symlink)."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.symlink_to(content)
        else:
            path.write_bytes(content)
    return str(root)


@pytest.fixture()
def store(tmp_path: Path) -> dict[str, str]:
    s = tmp_path / "store"
    return {
        "busybox": _package(
            s / "aaa-busybox",
            {"bin/busybox": b"\x7fELF", "bin/sh": "busybox", "bin/env": "busybox"},
        ),
        "cacert": _package(
            s / "bbb-nss-cacert",
            {"etc/ssl/certs/ca-bundle.crt": b"PEM", "nix-support/setup-hook": b""},
        ),
        "jq": _package(
            s / "ccc-jq",
            {"bin/jq": b"\x7fELF", "share/man/man1/jq.1": b"man", "lib": "../ddd-oniguruma/lib"},
        ),
        "other": _package(
            s / "eee-other",
            {"bin/sh": b"another sh", "lib/libx.so": b"x", "share/man/man1/other.1": b"man"},
        ),
        "single": _package(s, {"fff-script.sh": b"#!/bin/sh\n"}) + "/fff-script.sh",
    }


def _by_name(entries: list[Entry]) -> dict[str, Entry]:
    return {e.name: e for e in entries}


def test_merged_directories_and_links_to_store_paths(store: dict[str, str]) -> None:
    forest = _by_name(forest_entries([store["busybox"], store["cacert"], store["jq"]]))
    for directory in ("bin", "etc", "etc/ssl", "etc/ssl/certs", "share/man/man1", "usr/bin"):
        assert forest[directory].kind == "dir" and forest[directory].mode == 0o755
    cert = forest["etc/ssl/certs/ca-bundle.crt"]
    assert cert.kind == "symlink"
    assert cert.target == store["cacert"] + "/etc/ssl/certs/ca-bundle.crt"
    assert forest["bin/sh"].target == store["busybox"] + "/bin/sh"  # to the store's own link
    assert forest["bin/jq"].target == store["jq"] + "/bin/jq"
    assert forest["lib"].kind == "symlink"  # a root's symlink is linked, not followed
    assert forest["nix-support/setup-hook"].kind == "symlink"
    assert all(
        not e.target or os.path.isabs(e.target) or e.name == "usr/bin/env" for e in forest.values()
    )


def test_first_root_wins_conflicts(store: dict[str, str]) -> None:
    first = _by_name(forest_entries([store["busybox"], store["other"]]))
    second = _by_name(forest_entries([store["other"], store["busybox"]]))
    assert first["bin/sh"].target == store["busybox"] + "/bin/sh"
    assert second["bin/sh"].target == store["other"] + "/bin/sh"
    assert first["bin/busybox"] == second["bin/busybox"]  # no conflict: both have it
    assert first["share/man/man1/other.1"].kind == "symlink"


def test_a_directory_does_not_merge_with_a_link(store: dict[str, str]) -> None:
    link_first = _by_name(forest_entries([store["jq"], store["other"]]))
    assert link_first["lib"].kind == "symlink"
    assert "lib/libx.so" not in link_first  # the later root's lib/ subtree is dropped
    dir_first = _by_name(forest_entries([store["other"], store["jq"]]))
    assert dir_first["lib"].kind == "dir" and "lib/libx.so" in dir_first


def test_tmp_env_and_skipped_roots(store: dict[str, str], tmp_path: Path) -> None:
    link_root = tmp_path / "store" / "ggg-link"
    link_root.symlink_to(store["jq"])
    forest = _by_name(forest_entries([store["single"], str(link_root)]))
    assert set(forest) == {"tmp", "usr", "usr/bin", "usr/bin/env"}
    assert forest["tmp"].kind == "dir" and forest["tmp"].mode == 0o1777
    assert forest["usr/bin/env"].target == "/bin/env"


def test_a_roots_own_usr_bin_env_and_tmp(tmp_path: Path) -> None:
    root = _package(tmp_path / "hhh-coreutils", {"usr/bin/env": b"env", "tmp/keep": b""})
    forest = _by_name(forest_entries([root]))
    assert forest["usr/bin/env"].target == root + "/usr/bin/env"
    assert forest["tmp"].mode == 0o1777 and forest["tmp/keep"].kind == "symlink"


def test_deterministic_and_duplicate_roots(store: dict[str, str]) -> None:
    roots = [store["busybox"], store["cacert"], store["jq"]]
    once = forest_entries(roots)
    assert once == forest_entries([*roots, roots[0] + "/", roots[1]])
    keys = [os.fsencode(e.name) for e in once]
    assert keys == sorted(keys)
    with pytest.raises(PackError, match="absolute"):
        forest_entries(["relative/path"])
    with pytest.raises(PackError, match="No such file"):
        forest_entries([roots[0] + "-missing"])


def test_packed_top_layer(store: dict[str, str], tmp_path: Path) -> None:
    roots = [store["busybox"], store["cacert"], store["jq"]]
    sink, again = io.BytesIO(), io.BytesIO()
    packed = pack_top_layer(roots, sink)
    assert pack_top_layer(roots, again) == packed and sink.getvalue() == again.getvalue()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(sink.getvalue()))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert members["usr/bin/env"].issym() and members["usr/bin/env"].linkname == "/bin/env"
    assert members["bin/sh"].linkname == store["busybox"] + "/bin/sh"
    assert all(m.uid == 0 and m.mtime == 1 for m in members.values())

    if shutil.which("tar"):
        layer = tmp_path / "top.tar.gz"
        layer.write_bytes(sink.getvalue())
        listing = subprocess.run(
            ["tar", "-tvzf", str(layer)], check=True, capture_output=True, text=True
        ).stdout
        assert "drwxrwxrwt 0/0               0 1970-01-01 00:00 tmp/" in listing
        out = tmp_path / "rootfs"
        out.mkdir()
        subprocess.run(["tar", "-xzf", str(layer), "-C", str(out)], check=True)
        assert (out / "etc/ssl/certs/ca-bundle.crt").read_bytes() == b"PEM"  # resolves
        assert (out / "bin/jq").read_bytes() == b"\x7fELF"
