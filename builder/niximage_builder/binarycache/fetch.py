"""One binary cache, read over HTTP(S) or from a ``file://`` folder.

An adapter: ``requests`` for HTTP (with a netrc file's credentials, as Nix's
``netrc-file``), the file system for ``file://``. What it gives is checked: the cache's
``StoreDir``, each narinfo's form, and each NAR's served size and ``FileHash`` as it
streams (the NAR's own size and hash are checked by its reader, ``nar``). Errors are
``SubstituteError``: ``CacheUnreachable`` (transient when the server may come back),
``CorruptCache``.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import netrc
import os
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import requests
import urllib3
import zstandard

from niximage_builder.binarycache.nar import Readable
from niximage_builder.binarycache.narinfo import STORE_DIR, NarInfo, hash_part, parse_narinfo
from niximage_core.errors import InvalidInput, SubstituteError

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
"""Seconds without a byte from the server before a read fails (not the whole download)."""
_ABSENT = frozenset({403, 404, 410})
"""What a cache answers for a path it does not have (S3 says 403 without list rights)."""
DEFAULT_PRIORITY = 50


def check_url(url: str) -> str:
    """A substituter URL as given in settings: http(s):// or file://, no credentials."""
    parts = urlsplit(url)
    remote = parts.scheme in ("http", "https")
    if not (remote and parts.hostname) and parts.scheme != "file":
        raise InvalidInput(f"substituter {url[:200]!r} is not an http(s):// or file:// URL")
    if parts.username or parts.password:
        raise InvalidInput(f"substituter {parts.hostname}: put credentials in the netrc file")
    if parts.query or parts.fragment:
        raise InvalidInput(f"substituter {url[:200]!r}: no query or fragment")
    return url.rstrip("/")


class _Counting:
    """The file as served: counted and hashed as the decompressor reads it."""

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """The response or file underneath is closed by its owner, ``_open``."""

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _Decompressed:
    """A decompressor whose failures say which NAR was damaged (and are not mistaken for
    the reader's own errors, such as a full spool disk)."""

    def __init__(self, stream: Readable, corrupt: Callable[[str], SubstituteError]) -> None:
        self._stream = stream
        self._corrupt = corrupt

    def read(self, size: int, /) -> bytes:
        try:
            return self._stream.read(size)
        except (lzma.LZMAError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise self._corrupt(f"it does not decompress: {exc}") from exc


def _decompressor(compression: str, raw: _Counting) -> Readable:
    if compression == "xz":
        return lzma.LZMAFile(raw)  # type: ignore[arg-type]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    if compression == "bzip2":
        return bz2.BZ2File(raw)  # type: ignore[arg-type]
    return raw


class BinaryCache:
    """One substituter. Thread-safe: the closure query and the layer packers share it."""

    def __init__(
        self,
        url: str,
        netrc_file: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.url = check_url(url)
        self._parts = urlsplit(self.url)
        self._session = session or requests.Session()
        self._auth = _netrc_auth(netrc_file, self._parts.hostname)
        self._priority: int | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BinaryCache({self.url!r})"

    @property
    def priority(self) -> int:
        """``Priority`` of ``nix-cache-info`` (lower is asked first, as in Nix); checks the
        cache's store directory the first time."""
        with self._lock:
            if self._priority is None:
                self._priority = self._read_info()
            return self._priority

    def _read_info(self) -> int:
        text = self._get_text("nix-cache-info")
        if text is None:
            raise SubstituteError(
                "CorruptCache", f"{self.url} has no nix-cache-info: it is not a binary cache"
            )
        fields = dict(line.partition(": ")[::2] for line in text.splitlines() if ": " in line)
        store_dir = fields.get("StoreDir", STORE_DIR)
        if store_dir != STORE_DIR:
            raise SubstituteError(
                "CorruptCache", f"{self.url} holds paths of {store_dir[:100]}, not {STORE_DIR}"
            )
        try:
            return int(fields.get("Priority", DEFAULT_PRIORITY))
        except ValueError:
            return DEFAULT_PRIORITY

    def narinfo(self, store_path: str) -> NarInfo | None:
        """The cache's narinfo of ``store_path`` (not yet verified), or None if it has none."""
        text = self._get_text(f"{hash_part(store_path)}.narinfo")
        return None if text is None else parse_narinfo(text, store_path)

    @contextlib.contextmanager
    def nar(self, info: NarInfo, served: Callable[[int], None] | None = None) -> Iterator[Readable]:
        """The NAR of ``info``, decompressed as the cache serves it. The served file's size
        and ``FileHash`` are checked when the block ends (after the reader has the NAR);
        then ``served`` is told how many bytes came over the wire."""
        with self._open(info.url, f"the NAR of {info.store_path}") as raw:
            counted = _Counting(raw)
            decompressed = _decompressor(info.compression, counted)
            with contextlib.closing(decompressed):  # type: ignore[type-var]
                yield _Decompressed(decompressed, lambda why: self._corrupt(info, why))
            counted.drain()
        if info.file_size is not None and counted.size != info.file_size:
            raise self._corrupt(info, f"{counted.size} bytes served, FileSize {info.file_size}")
        if info.file_hash is not None and counted.hash.digest() != info.file_hash:
            raise self._corrupt(info, "the file's sha256 is not its FileHash")
        if served is not None:
            served(counted.size)

    def _corrupt(self, info: NarInfo, why: str) -> SubstituteError:
        return SubstituteError("CorruptCache", f"{info.store_path} from {self.url}: {why}")

    def _get_text(self, name: str) -> str | None:
        with self._open(name, name, absent_ok=True) as raw:
            if raw is None:
                return None
            data = raw.read(1 << 20 | 1)
        if len(data) > 1 << 20:
            raise SubstituteError("CorruptCache", f"{self.url}/{name} is over 1 MiB")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise SubstituteError("CorruptCache", f"{self.url}/{name} is not text") from None

    @contextlib.contextmanager
    def _open(self, name: str, what: str, absent_ok: bool = False) -> Iterator[BinaryIO]:
        if self._parts.scheme == "file":
            path = os.path.join(unquote(self._parts.path), name)
            try:
                stream = open(path, "rb")  # noqa: SIM115 (closed below, after the yield)
            except FileNotFoundError:
                if absent_ok:
                    yield None  # type: ignore[misc]
                    return
                raise SubstituteError("CorruptCache", f"{self.url} lacks {name} ({what})") from None
            except OSError as err:
                raise SubstituteError(
                    "CacheUnreachable", f"{self.url}: cannot read {name}: {err.strerror}"
                ) from err
            with stream:
                yield stream
            return
        url = f"{self.url}/{name}"
        try:
            response = self._session.get(
                url, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), auth=self._auth
            )
        except requests.RequestException as exc:
            raise SubstituteError(
                "CacheUnreachable", f"cache {self.url} is unreachable: {_reason(exc)}", True
            ) from exc
        with response:
            status = response.status_code
            if status in _ABSENT and absent_ok:
                yield None  # type: ignore[misc]
                return
            if status == 401:
                raise SubstituteError(
                    "CacheUnreachable",
                    f"cache {self.url} refused its credentials for {name} (HTTP 401): "
                    "check the netrc file",
                )
            if status in _ABSENT:
                raise SubstituteError(
                    "CorruptCache", f"{self.url} lacks {name} ({what}): HTTP {status}"
                )
            if status != 200:
                raise SubstituteError(
                    "CacheUnreachable",
                    f"cache {self.url} answered HTTP {status} for {name}",
                    status >= 500 or status == 429,
                )
            response.raw.decode_content = True
            try:
                yield response.raw
            except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                raise SubstituteError(
                    "CacheUnreachable",
                    f"cache {self.url} broke off {name}: {_reason(exc)}",
                    True,
                ) from exc


def _reason(exc: BaseException) -> str:
    """The innermost cause, e.g. ``[Errno 111] Connection refused``, not urllib3's repr."""
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return str(exc)[:300] or type(exc).__name__


def _netrc_auth(path: str | None, host: str | None) -> tuple[str, str] | None:
    if not path or not host:
        return None
    try:
        found = netrc.netrc(path).authenticators(host)
    except FileNotFoundError:
        raise InvalidInput(f"netrc file {path} does not exist") from None
    except (netrc.NetrcParseError, OSError) as exc:
        raise InvalidInput(f"netrc file {path} cannot be read: {exc}") from exc
    if found is None:
        return None
    login, _account, password = found
    return login, password or ""
