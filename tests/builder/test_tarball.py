"""Layer tarballs: deterministic bytes, readable by Python's tarfile and GNU tar, digests
that mean what the OCI spec says, bounded memory. Trees are built in tmp_path: any absolute
directory packs like a store path."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from niximage_builder import tarball
from niximage_builder.compression import CHUNK_SIZE, GZIP_HEADER, make_compressor
from niximage_builder.tarball import (
    Entry,
    PackedLayer,
    PackError,
    normalize,
    pack_entries,
    pack_paths,
    packing,
    scan_paths,
    tar_header,
)
from niximage_builder.tarball.streaming import PIPELINE_DEPTH, LayerStream
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput

LONG_DIR = "d" * 90 + "/" + "e" * 90  # 181 bytes: fits the ustar prefix/name split
HUGE_NAME = "f" * 200  # one 200-byte component: only a PAX path can hold it
LONG_TARGET = "../" + "t" * 150  # a symlink target over the 100-byte linkname field


def _store(tmp_path: Path) -> Path:
    """A store-like tree: 0555 dirs, 0444/0555 files, symlinks, a hard link, an empty
    dir, long and non-ASCII names."""
    pkg = tmp_path / "store" / "abc123-pkg"
    (pkg / "bin").mkdir(parents=True)
    (pkg / "share" / "empty").mkdir(parents=True)
    (pkg / LONG_DIR).mkdir(parents=True)
    (pkg / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (pkg / "bin" / "tool").chmod(0o555)
    (pkg / "share" / "data.txt").write_bytes(b"data\n" * 1000)
    (pkg / "share" / "data.txt").chmod(0o444)
    os.link(pkg / "share" / "data.txt", pkg / "share" / "hardlink.txt")
    (pkg / "bin" / "alias").symlink_to("tool")
    (pkg / "bin" / "far").symlink_to(LONG_TARGET)
    (pkg / LONG_DIR / "file").write_bytes(b"deep\n")
    (pkg / LONG_DIR / HUGE_NAME).write_bytes(b"huge name\n")
    (pkg / "share" / "ünïcödé").write_bytes(b"utf-8 name\n")
    (pkg / "share" / os.fsdecode(b"raw\xff")).write_bytes(b"non-utf-8 name\n")
    for directory in (pkg / "bin", pkg / "share", pkg / "share" / "empty", pkg):
        directory.chmod(0o555)
    return pkg


@pytest.fixture()
def pkg(tmp_path: Path):
    path = _store(tmp_path)
    yield path
    for directory, _dirs, _files in os.walk(tmp_path):  # let pytest clean up 0555 dirs
        os.chmod(directory, 0o755)


def _pack(paths: list[str], compression: str = "gzip") -> tuple[PackedLayer, bytes]:
    sink = io.BytesIO()
    packed = pack_paths(paths, sink, compression)  # type: ignore[arg-type]
    return packed, sink.getvalue()


def _members(tar_bytes: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: m for m in tar.getmembers()}


def _rel(path: Path) -> str:
    return str(path).lstrip("/")


# --- determinism -----------------------------------------------------------------------------


def test_same_input_same_bytes_whatever_the_order(pkg: Path, tmp_path: Path) -> None:
    other = tmp_path / "store" / "def456-other"
    other.mkdir()
    (other / "x").write_bytes(b"x")
    first, blob = _pack([str(pkg), str(other)])
    again, blob_again = _pack([str(other), str(pkg), str(pkg) + "/"])
    nested, blob_nested = _pack([str(pkg / "bin"), str(other), str(pkg)])
    assert blob == blob_again == blob_nested
    assert first == again == nested


def test_entries_sorted_by_name_bytes_with_directories_first(pkg: Path) -> None:
    _, blob = _pack([str(pkg)])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        names = [m.name for m in tar.getmembers()]
    keys = [os.fsencode(name) for name in names]
    assert keys == sorted(keys)
    assert len(set(names)) == len(names)
    root = _rel(pkg)
    assert names.index(root) < names.index(root + "/bin") < names.index(root + "/bin/tool")


# --- format ----------------------------------------------------------------------------------


def test_modes_owners_mtimes_and_types(pkg: Path) -> None:
    _, blob = _pack([str(pkg)])
    members = _members(gzip.decompress(blob))
    root = _rel(pkg)
    for member in members.values():
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert member.mtime == tarball.MTIME
    parts = root.split("/")
    for depth in range(1, len(parts)):  # tmp/, tmp/pytest-of-root/, ... : the ancestors
        ancestor = members["/".join(parts[:depth])]
        assert ancestor.isdir() and ancestor.mode == 0o755
    assert members[root].isdir() and members[root].mode == 0o555
    assert members[f"{root}/share/empty"].isdir()  # empty directories survive
    assert members[f"{root}/bin/tool"].isfile() and members[f"{root}/bin/tool"].mode == 0o555
    assert members[f"{root}/share/data.txt"].mode == 0o444
    alias = members[f"{root}/bin/alias"]
    assert alias.issym() and alias.linkname == "tool"
    assert members[f"{root}/bin/far"].linkname == LONG_TARGET


def test_hard_links_become_regular_files(pkg: Path) -> None:
    _, blob = _pack([str(pkg)])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        for name in ("data.txt", "hardlink.txt"):
            member = tar.getmember(f"{_rel(pkg)}/share/{name}")
            assert member.isfile() and not member.islnk()
            assert tar.extractfile(member).read() == b"data\n" * 1000  # type: ignore[union-attr]


def test_long_and_odd_names_round_trip(pkg: Path) -> None:
    _, blob = _pack([str(pkg)])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        names = set(tar.getnames())
        root = _rel(pkg)
        assert f"{root}/{LONG_DIR}/file" in names
        assert f"{root}/{LONG_DIR}/{HUGE_NAME}" in names
        assert f"{root}/share/ünïcödé" in names
        raw = f"{root}/share/" + os.fsdecode(b"raw\xff")
        assert tar.extractfile(raw).read() == b"non-utf-8 name\n"  # type: ignore[union-attr]


@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_gnu_tar_lists_and_extracts(pkg: Path, tmp_path: Path) -> None:
    _, blob = _pack([str(pkg)])
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(blob)
    listing = subprocess.run(
        ["tar", "-tvzf", str(layer)],
        check=True,
        capture_output=True,
        text=True,
        errors="surrogateescape",
    ).stdout.splitlines()
    root = _rel(pkg)
    lines = {line.split(" 1970-01-01 00:00 ")[1]: line for line in listing}
    assert lines[f"{root}/"].startswith("dr-xr-xr-x 0/0 ")
    assert lines[f"{root}/bin/tool"].startswith("-r-xr-xr-x 0/0 ")
    assert lines[f"{root}/bin/alias -> tool"].startswith("lrwxrwxrwx 0/0 ")
    assert f"{root}/{LONG_DIR}/{HUGE_NAME}" in lines
    assert f"{root}/share/empty/" in lines
    assert all("warning" not in line.lower() for line in listing)

    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(layer), "-C", str(out)], check=True)
    extracted = out / root
    assert (extracted / LONG_DIR / HUGE_NAME).read_bytes() == b"huge name\n"
    assert os.readlink(extracted / "bin" / "far") == LONG_TARGET
    assert (extracted / "share" / "hardlink.txt").stat().st_nlink == 1
    for directory, _dirs, _files in os.walk(out):
        os.chmod(directory, 0o755)


@pytest.mark.skipif(not shutil.which("gzip"), reason="needs GNU gzip")
def test_gnu_gzip_accepts_the_stream(pkg: Path) -> None:
    packed, blob = _pack([str(pkg)])
    out = subprocess.run(["gzip", "-dc"], input=blob, check=True, capture_output=True).stdout
    assert Digest.of(out) == packed.diff_id


def test_paths_outside_a_store_get_their_ancestors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"f")
    names = [e.name for e in scan_paths([str(tmp_path / "a" / "f")])]
    parts = _rel(tmp_path / "a" / "f").split("/")
    assert names == ["/".join(parts[: i + 1]) for i in range(len(parts))]


def test_pax_size_for_files_of_8_gib_and_more() -> None:
    huge = Entry.file("nix/store/x-big/blob", "/nonexistent", 9 << 30)
    with tarfile.open(fileobj=io.BytesIO(tar_header(huge)), mode="r|") as tar:
        member = tar.next()
        assert member is not None and member.name == huge.name and member.size == 9 << 30
    assert len(tar_header(Entry.file("a", "/x", (8 << 30) - 1))) == 512  # still plain ustar


def test_header_is_ustar_with_checksum() -> None:
    header = tar_header(Entry.directory("nix/store", 0o755))
    assert header[257:265] == b"ustar\x0000"
    assert int(header[148:154], 8) == sum(header[:148]) + 8 * 32 + sum(header[156:])
    assert header[:10] == b"nix/store/"


# --- compression and digests -----------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_digests_sizes_and_round_trip(pkg: Path, compression: str) -> None:
    packed, blob = _pack([str(pkg)], compression)
    if compression == "gzip":
        tar_bytes = gzip.decompress(blob)
        assert blob[:10] == GZIP_HEADER  # mtime 0, no name, OS 255
    elif compression == "zstd":
        tar_bytes = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    else:
        tar_bytes = blob
        assert packed.digest == packed.diff_id
    assert packed.diff_id == Digest(hashlib.sha256(tar_bytes).hexdigest())
    assert packed.digest == Digest(hashlib.sha256(blob).hexdigest())
    assert (packed.size, packed.tar_size) == (len(blob), len(tar_bytes))
    assert packed.compression == compression
    assert packed.media_type.startswith("application/vnd.oci.image.layer.v1.tar")
    assert f"{_rel(pkg)}/bin/tool" in _members(tar_bytes)


def test_layer_format_names_what_decides_the_bytes() -> None:
    assert tarball.layer_format("gzip") == "tar2+gzip-2"
    assert tarball.layer_format("zstd", 5) == "tar2+zstd-5"


def test_empty_gzip_stream_is_valid() -> None:
    compressor = make_compressor("gzip")
    assert gzip.decompress(compressor.flush()) == b""


@pytest.mark.parametrize(("compression", "level"), [("gzip", 9), ("zstd", 0), ("lz4", None)])
def test_bad_compression_settings(compression: str, level: int | None) -> None:
    with pytest.raises(InvalidInput):
        make_compressor(compression, level)  # type: ignore[arg-type]


def test_compressed_output_does_not_depend_on_file_layout(tmp_path: Path) -> None:
    """Same tar bytes, differently cut files: the blocks fed to gzip are the same."""
    entries = [Entry.inline("a", b"x" * (3 << 20)), Entry.inline("b", os.urandom(1 << 20))]
    one, two = io.BytesIO(), io.BytesIO()
    pack_entries(entries, one)
    pack_entries(list(reversed(entries)), two)
    assert one.getvalue() == two.getvalue()


# --- errors ----------------------------------------------------------------------------------


def test_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(PackError, match="FIFO"):
        scan_paths([str(tmp_path)])


def test_relative_root_and_missing_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="absolute"):
        scan_paths(["nix/store/x"])
    with pytest.raises(PackError, match="whole file system"):
        scan_paths(["/"])
    with pytest.raises(PackError, match="No such file"):
        scan_paths([str(tmp_path / "missing")])


def test_file_changed_after_scan(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"short")
    entries = scan_paths([str(tmp_path / "f")])
    (tmp_path / "f").write_bytes(b"longer now")
    with pytest.raises(PackError, match="changed"):
        pack_entries(entries, io.BytesIO())


@pytest.mark.parametrize("name", ["", "/abs", "a/", "a//b", "a/./b", "..", "a/../b", "a\0b"])
def test_invalid_entry_names(name: str) -> None:
    with pytest.raises(PackError):
        Entry.directory(name)


def test_normalize_adds_ancestors_and_rejects_conflicts() -> None:
    entries = normalize([Entry.symlink("usr/bin/env", "/bin/env")])
    assert [(e.name, e.kind, e.mode) for e in entries] == [
        ("usr", "dir", 0o755),
        ("usr/bin", "dir", 0o755),
        ("usr/bin/env", "symlink", 0o777),
    ]
    assert normalize(entries) == entries
    with pytest.raises(PackError, match="two different entries"):
        normalize([Entry.directory("a"), Entry.symlink("a", "b")])
    with pytest.raises(PackError, match="not a directory"):
        normalize([Entry.symlink("a", "b"), Entry.directory("a/c")])


# --- parallel and memory ---------------------------------------------------------------------


class _CountingSink:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)


def test_memory_is_bounded_for_a_200_mb_file(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:  # sparse: reads as zeros, costs no disk
        f.truncate(200 << 20)
    sink = _CountingSink()
    tracemalloc.start()
    try:
        packed = pack_paths([str(big)], sink, "gzip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert packed.tar_size > 200 << 20
    assert Digest(sink.hash.hexdigest()) == packed.digest and sink.size == packed.size
    # The chunks in flight (compressing, and the one filling), whatever the file's size.
    bound = (PIPELINE_DEPTH + 2) * tarball.BLOCK_SIZE
    assert peak < bound, f"peak {peak / 1e6:.1f} MB"


def test_inline_files() -> None:
    sink = io.BytesIO()
    pack_entries([Entry.inline("etc/passwd", b"root:x:0:0::/:/bin/sh\n", 0o644)], sink, "none")
    members = _members(sink.getvalue())
    assert list(members) == ["etc", "etc/passwd"]
    assert members["etc/passwd"].mode == 0o644 and members["etc/passwd"].size == 22
    with pytest.raises(PackError):
        Entry("x", "file", 0o444)


# --- a real OCI client ------------------------------------------------------------------------


def _oci_layout(directory: Path, layers: list[tuple[PackedLayer, bytes]]) -> None:
    """A minimal OCI image layout (``img:v1``) around our layers."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = Digest.of(data)
        (blobs / digest.hex).write_bytes(data)
        return {"digest": str(digest), "size": len(data)}

    for _packed, data in layers:
        blob(data)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [str(p.diff_id) for p, _ in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
            "layers": [
                {"mediaType": p.media_type, "digest": str(p.digest), "size": p.size}
                for p, _ in layers
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **blob(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@pytest.mark.clients
@pytest.mark.skipif(not shutil.which("umoci"), reason="needs umoci")
@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_umoci_unpacks_our_layers(pkg: Path, tmp_path: Path, compression: str) -> None:
    """umoci checks each layer's digest and diffID and extracts it with Go's archive/tar,
    the reader containerd uses too."""
    from niximage_builder.toplayer import pack_top_layer

    layer, top = _pack([str(pkg)], compression), io.BytesIO()
    top_layer = pack_top_layer([str(pkg)], top, compression)  # type: ignore[arg-type]
    _oci_layout(tmp_path / "layout", [layer, (top_layer, top.getvalue())])
    bundle = tmp_path / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run(
        ["umoci", "unpack", *rootless, "--image", f"{tmp_path / 'layout'}:v1", str(bundle)],
        check=True,
        capture_output=True,
    )
    rootfs = bundle / "rootfs"
    root = rootfs / _rel(pkg)
    assert (root / LONG_DIR / HUGE_NAME).read_bytes() == b"huge name\n"
    assert os.readlink(root / "bin" / "far") == LONG_TARGET
    assert stat.S_IMODE((root / "bin" / "tool").lstat().st_mode) == 0o555
    assert (root / "share" / "empty").is_dir()
    assert os.readlink(rootfs / "bin" / "tool") == str(pkg / "bin" / "tool")
    assert stat.S_IMODE((rootfs / "tmp").lstat().st_mode) == 0o1777
    for directory, _dirs, _files in os.walk(bundle):
        os.chmod(directory, 0o755)


# --- chunks: one big store path on every core -------------------------------------------------


def _big_tree(root: Path, count: int) -> Path:
    """``count`` files of 1.5 MiB of varied, compressible bytes."""
    tree = root / "big"
    tree.mkdir()
    seed = b"".join(hashlib.sha256(str(n).encode()).digest() for n in range(2048))
    for n in range(count):
        (tree / f"f{n:03}").write_bytes((seed[n:] + seed[:n]) * 16 + bytes(512 * 1024))
    return tree


def _pack_with(paths: list[str], compression: str, pool: object) -> tuple[bytes, PackedLayer]:
    sink = io.BytesIO()
    stream = LayerStream(sink, compression, None, pool)  # type: ignore[arg-type]
    for entry in scan_paths(paths):
        packing._write_entry(stream, entry)
    packed = stream.finish(compression)  # type: ignore[arg-type]
    return sink.getvalue(), packed


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_a_big_layer_is_chunked_and_its_bytes_never_depend_on_threads(
    tmp_path: Path, compression: str
) -> None:
    tree = str(_big_tree(tmp_path, 20))
    blob, packed = _pack_with([tree], compression, None)
    for threads in (1, 2, 3):
        with ThreadPoolExecutor(threads) as pool:
            again, packed_again = _pack_with([tree], compression, pool)
        assert (again, packed_again) == (blob, packed), f"{threads} threads"
    if compression == "gzip":
        tar_bytes = gzip.decompress(blob)  # every member, as every OCI client reads them
        assert blob.count(GZIP_HEADER) >= packed.tar_size // CHUNK_SIZE
    elif compression == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True
        )
        tar_bytes = reader.read()
    else:
        tar_bytes = blob
    assert len(tar_bytes) == packed.tar_size > 5 * CHUNK_SIZE
    assert Digest.of(tar_bytes) == packed.diff_id and Digest.of(blob) == packed.digest
    files = [m for m in _members(tar_bytes).values() if m.isfile()]
    on_disk = sum(path.stat().st_size for path in Path(tree).iterdir())
    assert len(files) == 20 and sum(m.size for m in files) == on_disk
    # GNU tar reads the multi-member stream too.
    if compression == "gzip":
        listed = subprocess.run(["tar", "-tzf", "-"], input=blob, capture_output=True, check=True)
        assert len(listed.stdout.splitlines()) == len(_members(tar_bytes))


def test_a_layer_of_one_chunk_is_one_member_as_before(tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"x" * 100_000)
    blob, packed = _pack_with([str(tmp_path / "small")], "gzip", None)
    assert blob.count(GZIP_HEADER) == 1 and packed.tar_size < CHUNK_SIZE
    single = make_compressor("gzip")
    tar_bytes = gzip.decompress(blob)
    assert single.compress(tar_bytes) + single.flush() == blob
