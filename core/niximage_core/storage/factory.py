"""Storage from a URL: ``gs://bucket[/prefix]``, ``file:///path`` or a plain path.

Parsing is pure (``parse_storage_url``); only ``open_storage`` touches the world, and it
imports the GCS backend (and the Google libraries) only for ``gs://`` URLs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from niximage_core.errors import InvalidInput
from niximage_core.storage.base import Storage
from niximage_core.storage.filesystem import FilesystemStorage

# GCS bucket naming rules: 3-63 characters (222 with dots), lowercase letters, digits,
# "-", "_" and "."; starts and ends with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9._-]{1,220})[a-z0-9]")
# Same rule as GcsStorage applies: each part a safe name, no empty, "." or ".." part.
_PREFIX_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
RETRY_DEADLINE_ENV = "NIXIMAGE_GCS_RETRY_DEADLINE"
"""Seconds a GCS request is retried (429, 5xx, connection errors); the library's default
is 120 s, too long for a command line facing an outage."""
_USAGE = "expected gs://bucket[/prefix], file:///absolute/path or a directory path"


@dataclass(frozen=True)
class GcsLocation:
    bucket: str
    prefix: str = ""


@dataclass(frozen=True)
class FilesystemLocation:
    path: Path


def parse_storage_url(url: str) -> GcsLocation | FilesystemLocation:
    """Where a storage URL points; raises ``InvalidInput`` with the reason."""
    if not url.strip():
        raise InvalidInput(f"empty storage URL: {_USAGE}")
    if "\0" in url:
        raise InvalidInput(f"invalid storage URL {url[:200]!r}: contains a NUL byte")
    scheme = _SCHEME.match(url)
    if scheme is None:
        return FilesystemLocation(Path(os.path.abspath(os.path.expanduser(url))))
    name = scheme.group(1).lower()
    if name == "gs":
        return _parse_gs(url)
    if name == "file":
        return _parse_file(url)
    raise InvalidInput(f"unsupported storage URL scheme {name!r} in {url[:200]!r}: {_USAGE}")


def open_storage(url: str, retry_deadline: float | None = None) -> Storage:
    """Open (and for a directory, create) the storage ``url`` names.

    ``retry_deadline``: seconds a GCS call keeps retrying before it fails (a registry
    answers 503 within that when storage is down, before kubelets give up); else
    ``$NIXIMAGE_GCS_RETRY_DEADLINE``, else the library's 120 s (builders ride out blips).
    """
    location = parse_storage_url(url)
    if isinstance(location, FilesystemLocation):
        return FilesystemStorage(location.path)
    from niximage_core.storage.gcs import GcsStorage, retry_within  # GCS users only

    if retry_deadline is not None:
        if retry_deadline <= 0:
            raise InvalidInput("the storage deadline must be positive")
        return GcsStorage(location.bucket, location.prefix, retry=retry_within(retry_deadline))
    deadline = os.environ.get(RETRY_DEADLINE_ENV)
    if deadline is None:
        return GcsStorage(location.bucket, location.prefix)
    try:
        seconds = float(deadline)
    except ValueError:
        raise InvalidInput(f"{RETRY_DEADLINE_ENV} must be a number of seconds") from None
    return GcsStorage(location.bucket, location.prefix, retry=retry_within(seconds))


def _parse_gs(url: str) -> GcsLocation:
    parts = urlsplit(url)
    if not url.lower().startswith("gs://"):
        raise InvalidInput(f"invalid GCS URL {url[:200]!r}: {_USAGE}")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise InvalidInput(f"invalid GCS URL {url[:200]!r}: no query or fragment allowed")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or (len(bucket) > 63 and "." not in bucket):
        raise InvalidInput(
            f"invalid GCS bucket name {bucket[:100]!r} in {url[:200]!r}: 3-63 lowercase "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )
    prefix = parts.path.strip("/")
    if prefix and not all(_PREFIX_PART.fullmatch(p) for p in prefix.split("/")):
        raise InvalidInput(f"invalid prefix {prefix[:200]!r} in GCS URL {url[:200]!r}")
    return GcsLocation(bucket, prefix)


def _parse_file(url: str) -> FilesystemLocation:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise InvalidInput(f"invalid file URL {url[:200]!r}: {_USAGE}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidInput(f"invalid file URL {url[:200]!r}: the path must be absolute")
    return FilesystemLocation(Path(os.path.normpath(path)))
