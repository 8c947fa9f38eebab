"""The pure parts of binary cache support: Nix's base-32, narinfo and its signatures, and
the NAR reader (against NARs written here and by ``nix-store --dump``)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from niximage_builder import tarball
from niximage_builder.binarycache import nixbase32
from niximage_builder.binarycache.nar import NarFormatError, read_nar
from niximage_builder.binarycache.narinfo import TrustedKeys, parse_narinfo, parse_sha256
from niximage_core.errors import InvalidInput, SubstituteError
from tests.binarycache.narsupport import Signer, nar, narinfo_text
from testsupport import niximage

PATH = "/nix/store/" + "a" * 32 + "-demo-1.0"
DEP = "/nix/store/" + "b" * 32 + "-dep"


@given(st.binary(min_size=1, max_size=64))
def test_base32_round_trips(data: bytes) -> None:
    text = nixbase32.encode(data)
    assert len(text) == nixbase32.encoded_length(len(data))
    assert set(text) <= set(nixbase32.ALPHABET)
    assert nixbase32.decode(text, len(data)) == data


def test_base32_matches_nix() -> None:
    if shutil.which("nix") is None:
        pytest.skip("needs nix")
    digest = hashlib.sha256(b"niximage").hexdigest()
    nix = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "hash", "to-base32",
         "--type", "sha256", digest],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert nixbase32.encode(bytes.fromhex(digest)) == nix
    assert parse_sha256(f"sha256:{nix}") == parse_sha256(f"sha256:{digest}")


@pytest.mark.parametrize("text", ["e" * 52, "0" * 51, "z" * 52])
def test_base32_refuses_what_is_not_a_hash(text: str) -> None:
    with pytest.raises(ValueError):
        nixbase32.decode(text, 32)


def _info(data: bytes, signer: Signer | None, **changes: str) -> str:
    text = narinfo_text(PATH, data, [DEP, PATH], signer)
    for name, value in changes.items():
        text = "\n".join(
            f"{name}: {value}" if line.startswith(f"{name}:") else line
            for line in text.splitlines()
        )
    return text


def test_a_signed_narinfo_parses_and_verifies() -> None:
    signer = Signer()
    data = nar({"bin": {"demo": ("x", b"#!/bin/sh\n")}})
    info = parse_narinfo(_info(data, signer), PATH)
    assert info.references == (PATH, DEP) and info.nar_size == len(data)
    assert info.nar_hash == hashlib.sha256(data).digest()
    assert TrustedKeys.parse([signer.public]).verify(info, "http://cache") == signer.name


def test_an_unsigned_or_foreign_or_altered_narinfo_is_refused() -> None:
    signer, stranger = Signer("ours-1"), Signer("theirs-1")
    data = nar(b"hello")
    keys = TrustedKeys.parse([signer.public])
    with pytest.raises(SubstituteError, match="is not signed; trusted keys: ours-1") as err:
        keys.verify(parse_narinfo(_info(data, None), PATH), "http://cache")
    assert err.value.kind == "UntrustedPath"
    with pytest.raises(SubstituteError, match="signed by theirs-1"):
        keys.verify(parse_narinfo(_info(data, stranger), PATH), "http://cache")
    altered = _info(data, signer, NarSize="6")
    with pytest.raises(SubstituteError, match="does not match its narinfo"):
        keys.verify(parse_narinfo(altered, PATH), "http://cache")
    other_refs = _info(data, signer, References="")
    with pytest.raises(SubstituteError, match="does not match"):
        keys.verify(parse_narinfo(other_refs, PATH), "http://cache")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"StorePath": DEP}, "it describes"),
        ({"URL": "../../etc/passwd"}, "not a path inside the cache"),
        ({"URL": "/etc/passwd"}, "not a path inside the cache"),
        ({"Compression": "br"}, "compression 'br'"),
        ({"NarHash": "md5:abc"}, "not a sha256 hash"),
        ({"NarSize": "lots"}, "invalid literal"),
        ({"References": "../../x"}, "not a store path name"),
    ],
)
def test_a_malformed_narinfo_says_what_is_wrong(change: dict[str, str], message: str) -> None:
    with pytest.raises(SubstituteError, match=message) as err:
        parse_narinfo(_info(nar(b"x"), None, **change), PATH)
    assert err.value.kind == "CorruptCache"


@pytest.mark.parametrize("key", ["nokey", "k:short", "k:" + "A" * 44, "bad name:" + "A" * 43 + "="])
def test_a_bad_trusted_key_is_invalid_input(key: str) -> None:
    with pytest.raises(InvalidInput, match="is not 'name:base64 of 32 bytes'"):
        TrustedKeys.parse([key])


def _read(data: bytes, tmp_path: Path, size: int | None = None) -> list[tarball.Entry]:
    spool = tmp_path / "spool"
    with open(spool, "wb") as out:
        listing = read_nar(
            io.BytesIO(data), PATH, out, str(spool), len(data) if size is None else size
        )
    assert spool.read_bytes() == data and listing.nar_hash == hashlib.sha256(data).digest()
    return listing.entries


def test_nar_entries_are_the_store_modes_and_point_into_the_spool(tmp_path: Path) -> None:
    data = nar({"bin": {"run": ("x", b"#!/bin/sh\necho hi\n")}, "lib": {"a": ("->", b"../bin/run")},
                "share": {"empty": {}, "doc": b"text"}})  # fmt: skip
    entries = {e.name.removeprefix(PATH[1:]): e for e in _read(data, tmp_path)}
    assert entries[""].kind == "dir" and entries[""].mode == 0o555
    run = entries["/bin/run"]
    assert (run.kind, run.mode, run.size) == ("file", 0o555, 18)
    assert data[run.offset : run.offset + run.size] == b"#!/bin/sh\necho hi\n"
    assert entries["/share/doc"].mode == 0o444
    assert entries["/lib/a"].target == "../bin/run"
    assert entries["/share/empty"].kind == "dir"


def test_a_single_file_store_path(tmp_path: Path) -> None:
    (entry,) = _read(nar(b"just a file"), tmp_path)
    assert entry.name == PATH[1:] and entry.kind == "file" and entry.size == 11


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (nar({"a": b"x"})[:-9], "ends early"),
        (nar({"a": b"x"}) + b"\0" * 8, "not NarSize"),
        (nar({"a": b"x"}).replace(b"nix-archive-1", b"nix-archive-2"), "expected b'nix-archive-1'"),
        (nar({"..": b"x"}), "is not allowed"),
        (nar({"a/b": b"x"}), "is not allowed"),
        (nar({"b": b"x", "a": b"y"}).replace(b"\x01\0\0\0\0\0\0\0a", b"\x01\0\0\0\0\0\0\0c"),
         "not sorted"),
        (nar(("?", b"x")).replace(b"symlink", b"socket\0"), "unknown NAR node type"),
    ],
)  # fmt: skip
def test_a_malformed_nar_is_corrupt(data: bytes, message: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with open(spool, "wb") as out, pytest.raises(NarFormatError, match=message) as err:
        read_nar(
            io.BytesIO(data),
            PATH,
            out,
            str(spool),
            len(data) if "early" not in message else len(data) + 9,
        )
    assert err.value.kind == "CorruptCache"


def test_a_file_larger_than_the_narsize_stops_at_once(tmp_path: Path) -> None:
    data = nar({"big": b"x" * 100})
    with open(tmp_path / "s", "wb") as out, pytest.raises(NarFormatError, match="longer than"):
        read_nar(io.BytesIO(data), PATH, out, str(tmp_path / "s"), 120)


def test_a_store_path_packs_to_the_same_layer_from_its_nar_as_from_the_store(
    tmp_path: Path,
) -> None:
    """The warm-store way (scan the path) and the cache way (its NAR) give one digest."""
    if shutil.which("nix-store") is None:
        pytest.skip("needs nix-store")
    proc = subprocess.run(
        ["nix-build", str(Path(__file__).parents[2] / "nix" / "testpkgs"), "-A", "python3",
         "--no-out-link"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip("the offline package set does not build here")
    path = proc.stdout.split()[-1]
    data = subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True).stdout
    spool = tmp_path / "spool"
    with open(spool, "wb") as out:
        listing = read_nar(io.BytesIO(data), path, out, str(spool), len(data))
    from_nar = tarball.pack_normalized(tarball.normalize(listing.entries), io.BytesIO(), "gzip")
    from_store = tarball.pack_paths([path], io.BytesIO(), "gzip")
    assert from_nar == from_store
    assert os.path.getsize(spool) == len(data)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--substituter", "ftp://cache"], "is not an http(s):// or file:// URL"),
        (["--substituter", "https://cache"], "--substituter needs a --trusted-public-key"),
        (["--trusted-public-key", "k:" + "A" * 43 + "="], "needs a --substituter"),
        (["--substituter", "https://c", "--trusted-public-key", "k:x"], "name:base64 of 32"),
        (["--substituter", "https://u:p@c", "--trusted-public-key", "k:x"], "netrc file"),
    ],
)
def test_bad_cache_flags_exit_2_before_nix_runs(flags: list[str], message: str) -> None:
    proc = niximage("build", "jq", "--storage", "/nonexistent", *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_root_listing_round_trips_and_a_foreign_record_is_ignored() -> None:
    from niximage_builder import listings

    own = PATH[1:]
    entries = [
        tarball.Entry.directory(own, 0o555),
        tarball.Entry.directory(own + "/bin", 0o555),
        tarball.Entry.file(own + "/bin/demo", "/spool", 3, 0o555),
    ]
    back = listings.decode(PATH, listings.encode(PATH, entries))
    assert back is not None
    assert [(e.name, e.kind == "dir") for e in back] == [(e.name, e.kind == "dir") for e in entries]
    assert listings.decode(DEP, listings.encode(PATH, entries)) is None  # another path's
    assert listings.decode(PATH, b"not zlib") is None
    assert listings.listing_key(PATH) == "listings/" + "a" * 32
