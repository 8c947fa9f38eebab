"""Pure parts: Range parsing, path parsing, user files, the TTL cache."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from niximage_core import layout
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_core.storage.filesystem import FilesystemStorage
from niximage_registry import auth, paths, ranges
from niximage_registry.content import CacheSettings, Content, SingleFlight, TtlCache
from niximage_registry.errors import Code, RegistryError

HEX = "a" * 64


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=0-9", 10, (0, 9)),
        ("bytes=0-100", 10, (0, 9)),
        ("bytes=3-", 10, (3, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("BYTES = 1 - 2", 10, (1, 2)),
        ("items=0-1", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("garbage", 10, None),
    ],
)
def test_ranges(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    selected = ranges.parse(header, size)
    assert (None if selected is None else (selected.start, selected.end)) == expected


@pytest.mark.parametrize(
    "header",
    [
        "bytes=10-",
        "bytes=5-4",
        "bytes=-0",
        "bytes=a-b",
        "bytes=-",
        "bytes=1-2-3",
        "bytes=0-",
        "bytes=" + "9" * 30 + "-",
    ],
)
def test_unsatisfiable_ranges(header: str) -> None:
    size = 0 if header == "bytes=0-" else 10
    with pytest.raises(ranges.Unsatisfiable):
        ranges.parse(header, size)


def test_content_range() -> None:
    selected = ranges.parse("bytes=2-", 10)
    assert selected is not None
    assert selected.content_range() == "bytes 2-9/10" and selected.length == 8


@pytest.mark.parametrize(
    ("path", "kind", "name", "ref"),
    [
        ("/v2/", paths.Kind.BASE, "", ""),
        ("/v2/a/manifests/latest", paths.Kind.MANIFEST, "a", "latest"),
        ("/v2/a/b/c/manifests/v1.0_x-y", paths.Kind.MANIFEST, "a/b/c", "v1.0_x-y"),
        (f"/v2/a/manifests/sha256:{HEX}", paths.Kind.MANIFEST, "a", f"sha256:{HEX}"),
        (f"/v2/blobs/blobs/sha256:{HEX}", paths.Kind.BLOB, "blobs", f"sha256:{HEX}"),
        ("/v2/manifests/manifests/manifests", paths.Kind.MANIFEST, "manifests", "manifests"),
        ("/v2/x/tags/list", paths.Kind.TAGS, "x", ""),
        ("/v2/x/tags/tags/list", paths.Kind.TAGS, "x/tags", ""),
        ("/v2/x/blobs/uploads/", paths.Kind.UPLOAD, "x", ""),
        ("/v2/x/blobs/uploads/123", paths.Kind.UPLOAD, "x", ""),
        ("/v2/a.b/c__d/e--f/manifests/t", paths.Kind.MANIFEST, "a.b/c__d/e--f", "t"),
    ],
)
def test_paths(path: str, kind: paths.Kind, name: str, ref: str) -> None:
    target = paths.parse(path)
    assert (target.kind, target.name, target.reference) == (kind, name, ref)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/A/manifests/latest", "NAME_INVALID"),
        ("/v2/a..b/manifests/latest", "NAME_INVALID"),
        ("/v2/../manifests/latest", "NAME_INVALID"),
        ("/v2/a/manifests/.hidden", "TAG_INVALID"),
        ("/v2/a/manifests/sha256:xyz", "DIGEST_INVALID"),
        ("/v2/a/blobs/latest", "DIGEST_INVALID"),
        ("/v2/a/blobs/sha512:" + "b" * 128, "BLOB_UNKNOWN"),
        ("/v2/a/nothing", "UNSUPPORTED"),
        ("/elsewhere", "UNSUPPORTED"),
        ("/v2/" + "a" * 3000, "NAME_INVALID"),
    ],
)
def test_bad_paths(path: str, code: str) -> None:
    with pytest.raises(RegistryError) as caught:
        paths.parse(path)
    assert caught.value.code.name == code and 400 <= caught.value.status < 500


def test_ttl_cache_expires_and_bounds_weight() -> None:
    cache: TtlCache[str, bytes] = TtlCache(60, 100, len, 10)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    cache.put("c", b"1")
    assert cache.get("a") is None and cache.get("b") == b"12345" and len(cache) == 2
    expired: TtlCache[str, int] = TtlCache(-1, 10)
    expired.put("a", 1)
    assert expired.get("a") is None


def test_users_from_file_and_secret_directory(tmp_path: Path) -> None:
    file = tmp_path / "users"
    file.write_text("# comment\nalice:s3cret\n\nbob:with:colon\n")
    assert auth.load_users(file) == {"alice": "s3cret", "bob": "with:colon"}
    secret = tmp_path / "secret"
    (secret / "..2026_01_01").mkdir(parents=True)
    (secret / "..data").symlink_to(secret / "..2026_01_01")
    (secret / "..2026_01_01" / "alice").write_text("s3cret\n")
    (secret / "alice").symlink_to(secret / "..data" / "alice")
    assert auth.load_users(secret) == {"alice": "s3cret"}
    (tmp_path / "empty").write_text("alice:\n")
    with pytest.raises(InvalidInput):
        auth.load_users(tmp_path / "empty")
    (tmp_path / "bad").write_text("no colon here\n")
    with pytest.raises(InvalidInput):
        auth.load_users(tmp_path / "bad")


class CountingStorage(FilesystemStorage):
    """Counts reads of tag keys, and holds each one until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.tag_reads = 0
        self.release = threading.Event()

    def read(self, key: str) -> bytes | None:
        if key.startswith("tags/"):
            self.tag_reads += 1
            self.release.wait(10)
        return super().read(key)


def test_concurrent_lookups_of_a_tag_share_one_read_even_with_the_cache_off(
    tmp_path: Path,
) -> None:
    """Manifests by tag under load: fifty lookups while one read is in flight make that
    one read; a later lookup (cache off) reads again; a cancelled caller cancels nothing."""
    storage = CountingStorage(tmp_path / "store")
    digest = Digest.of(b"manifest")
    storage.write(layout.tag_path("team/app", "1"), str(digest).encode())
    storage.tag_reads = 0

    async def scenario() -> None:
        with ThreadPoolExecutor(4) as pool:
            content = Content(storage, pool, CacheSettings(tag_ttl=0))
            lookups = [asyncio.ensure_future(content.tag("team/app", "1")) for _ in range(50)]
            await asyncio.sleep(0.1)
            lookups[0].cancel()  # a client that went away
            storage.release.set()
            answers = await asyncio.gather(*lookups[1:])
            assert answers == [digest] * 49
            assert storage.tag_reads == 1
            assert await content.tag("team/app", "1") == digest
            assert storage.tag_reads == 2  # the cache is off: a new request reads again

    asyncio.run(scenario())


def test_a_failed_shared_read_fails_every_waiter_and_is_not_remembered() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RegistryError(Code.UNAVAILABLE, "storage is down")

    async def scenario() -> None:
        results = await asyncio.gather(
            *(flights.run("k", failing) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, RegistryError) for r in results) and calls == 1
        assert len(flights) == 0
        with pytest.raises(RegistryError):
            await flights.run("k", failing)
        assert calls == 2

    asyncio.run(scenario())
