"""Image spec and build key: canonical, stable, unambiguous."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from niximage_core import imagespec, sources
from niximage_core.errors import InvalidInput

SRC = sources.parse_source("nixpkgs:" + "a" * 40)
ROOT = Path(__file__).resolve().parents[2]


def key(packages: list[str], **kwargs: str) -> str:
    return imagespec.make_spec(packages, kwargs.pop("source", SRC), **kwargs).build_key()


def test_key_is_sha256_hex() -> None:
    value = key(["jq"])
    assert len(value) == 64 and int(value, 16) >= 0


@given(st.permutations(["jq", "bash", "htop", "git", "python3.pkgs.six"]))
def test_order_never_changes_the_key(order: list[str]) -> None:
    assert key(order) == key(["bash", "git", "htop", "jq", "python3.pkgs.six"])


def test_duplicates_and_always_added_do_not_change_the_key() -> None:
    assert key(["jq", "jq"]) == key(["jq"]) == key(["jq", "cacert", "iana-etc"])


def test_no_ambiguous_joins() -> None:
    assert key(["ab", "c"]) != key(["a", "bc"])


def test_arch_source_and_format_are_in_the_key() -> None:
    base = key(["jq"])
    assert key(["jq"], arch="arm64") != base
    assert key(["jq"], source=sources.parse_source("nixpkgs:" + "b" * 40)) != base
    assert key(["jq"], format="docker") != base
    assert key(["jq"], compression="zstd") != base


def test_key_is_stable_across_processes_and_hash_seeds() -> None:
    code = (
        "from niximage_core import imagespec, sources;"
        f"print(imagespec.make_spec(['jq','bash'], sources.parse_source('nixpkgs:{'a' * 40}'))"
        ".build_key())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT / "core")},
        ).stdout.strip()
        for seed in ("0", "1", "12345")
    }
    assert outputs == {key(["bash", "jq"])}


def test_bad_arch_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        imagespec.make_spec(["jq"], SRC, arch="riscv")


def test_bad_package_names_the_package() -> None:
    with pytest.raises(InvalidInput, match="x y"):
        imagespec.make_spec(["jq", "x y"], SRC)


def test_systems() -> None:
    assert imagespec.make_spec(["jq"], SRC).system == "x86_64-linux"
    assert imagespec.make_spec(["jq"], SRC, arch="arm64").system == "aarch64-linux"


@pytest.mark.parametrize(
    ("text", "kind", "pinned"),
    [
        ("/srv/pkgs", "path", False),
        ("path:/srv/pkgs", "path", False),
        ("path:/srv/pkgs#sha256-Pco8fJQLrvj/kHkhBVnyHxfCvXAjSlhEWaZB3VMtgYM=", "path", True),
        ("nixpkgs:nixos-24.05", "nixpkgs", False),
        ("nixpkgs:" + "c" * 40, "nixpkgs", True),
        ("git:https://example.org/p.git#" + "d" * 40, "git", True),
        ("git:https://example.org/p.git#main", "git", False),
        ("git:https://example.org/p.git", "git", False),
    ],
)
def test_sources(text: str, kind: str, pinned: bool) -> None:
    source = sources.parse_source(text)
    assert source.type == kind
    assert source.pinned is pinned
    assert sources.parse_source(str(source)) == source


@pytest.mark.parametrize(
    "text",
    ["relative/dir", "nixpkgs:../x", "nixpkgs:a b", "git:ftp://x", "svn:x", "nixpkgs:", "x"],
)
def test_bad_sources(text: str) -> None:
    with pytest.raises(InvalidInput):
        sources.parse_source(text)
