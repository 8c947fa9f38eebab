"""Storage in a Google Cloud Storage bucket (docs/architecture.md#storage-layout), under an
optional name prefix.

    <prefix>blobs/sha256/<hex>        committed blobs, immutable
    <prefix>layers|builds|tags|gc/…   metadata objects
    <prefix>uploads/<uuid>            large blobs being written; never listed or read

Blobs are written by ``gcs_upload.GcsBlobWriter``: visible only complete and verified, under
create-only requests. An existing final object (HTTP 412 on the create-only request) means
another writer published the same content first: a success. Every call goes through one
``Retry`` (backoff on 429/5xx and connection errors); library exceptions become
``StorageError`` (``gcs_errors``).

The gc primitives (``base.Storage``'s gc part): ``touch_blob`` sets the object's
``customTime`` to now with a metadata patch: a new *metageneration*, the same generation
and bytes, so a streamed read pinned to the generation runs on, and a touch costs one
request whatever the blob's size. ``delete_blob_if_stale`` reads generation,
metageneration and the times, then deletes with ``ifGenerationMatch`` and
``ifMetagenerationMatch``: a touch in between made a new metageneration, and the delete
fails. A blob's mtime is the latest of ``customTime`` and ``updated``.

Imports digest, errors, the storage interface, ``gcs_errors``, ``gcs_signing``,
``gcs_upload``, ``checkpoints`` (the test hook at the protocol's decision points) and the
Google libraries.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, cast

import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from niximage_core.checkpoints import checkpoint
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NotFound, StorageError
from niximage_core.storage.base import Redirect, blob_key, check_key, check_prefix, is_key
from niximage_core.storage.gcs_errors import LIBRARY_ERRORS, fail, gs
from niximage_core.storage.gcs_signing import UrlSigner
from niximage_core.storage.gcs_upload import GcsBlobWriter

log = logging.getLogger(__name__)

# 8 MiB: few requests per layer, bounded memory with several layers uploading in parallel.
DEFAULT_CHUNK_SIZE = 8 << 20
_CHUNK_MULTIPLE = 256 << 10  # resumable uploads require multiples of 256 KiB
_MAX_SIGNED_TTL = 7 * 24 * 3600  # the V4 signing limit
_HEX = re.compile(r"[a-f0-9]{64}")
_PREFIX_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_EMULATOR_PROJECT = "niximage-emulator"
_STREAM_POOL = 1024  # idle connections kept for blob reads (one per concurrent read)
_STREAM_TIMEOUT = (10, 60)  # connect, and between two bytes of a response (the library's 60)
# A blob read's connection dropping mid-response (reopened at the offset reached).
_STREAM_ERRORS = (urllib3.exceptions.HTTPError, requests.RequestException, ConnectionError)


def retry_within(seconds: float) -> Retry:
    """The library's default retry policy (429, 5xx, connection errors, with backoff),
    giving up after ``seconds``."""
    return DEFAULT_RETRY.with_timeout(seconds)


def make_client(project: str | None = None) -> storage.Client:
    """A client from the environment: the emulator when ``STORAGE_EMULATOR_HOST`` is set.

    The emulator checks no credentials, and Application Default Credentials would try to
    reach Google's token endpoint; so anonymous credentials and a placeholder project
    (``GOOGLE_CLOUD_PROJECT`` if set). Otherwise ADC (service account key, GKE workload
    identity, gcloud login) as the library finds them.
    """
    try:
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or _EMULATOR_PROJECT
            return storage.Client(project=project, credentials=AnonymousCredentials())
        return storage.Client(project=project) if project else storage.Client()
    except auth_exceptions.GoogleAuthError as exc:
        raise StorageError(
            f"no usable Google Cloud credentials for GCS storage ({exc}); set "
            "GOOGLE_APPLICATION_CREDENTIALS or use workload identity"
        ) from exc


CONDITIONAL_ATTEMPTS = 10
"""Rounds of read-then-conditional-write before a key that keeps changing is an error."""


def _mtime(blob: storage.Blob) -> float:
    """When the blob was last written or touched: the later of ``customTime`` (our touch)
    and ``updated`` (its creation, or any metadata change)."""
    times = [t.timestamp() for t in (blob.custom_time, blob.updated) if t is not None]
    return max(times, default=0.0)


class GcsStorage:
    """A ``Storage`` in ``gs://bucket/prefix``; see the module doc."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: storage.Client | None = None,
        *,
        retry: Retry = DEFAULT_RETRY,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if not bucket or "/" in bucket:
            raise InvalidInput(f"invalid GCS bucket name: {bucket!r}")
        if chunk_size <= 0 or chunk_size % _CHUNK_MULTIPLE:
            raise InvalidInput(f"GCS chunk size must be a multiple of 256 KiB, not {chunk_size}")
        self._names = _normalise_prefix(prefix)
        self.url = f"gs://{bucket}/{self._names}".rstrip("/")
        self._own_client = client is None
        self._client = client if client is not None else make_client()
        self._bucket = self._client.bucket(bucket)
        self.retry = retry
        self.chunk_size = chunk_size
        self._signer = UrlSigner(self._client._credentials)
        self._streams: requests.Session | None = None
        self._stream_lock = threading.Lock()

    # names

    def _blob(self, name: str) -> storage.Blob:
        return self._bucket.blob(self._names + name)

    def _blob_for(self, digest: Digest) -> storage.Blob:
        return self._blob(f"blobs/sha256/{digest.hex}")

    def _where(self, name: str) -> str:
        """``gs://bucket/prefix/name``, for messages."""
        return f"gs://{self._bucket.name}/{self._names}{name}"

    # blobs

    def blob_size(self, digest: Digest) -> int | None:
        blob = self._get(self._blob_for(digest).name)
        return None if blob is None else int(blob.size or 0)

    def open_blob(self, digest: Digest) -> BinaryIO:
        name = self._blob_for(digest).name
        blob = self._get(name)
        if blob is None:
            raise NotFound(f"blob {digest} not found in {self.url}")
        return cast(BinaryIO, _Reader(self, blob))

    def stream_session(self) -> requests.Session:
        """The session blob reads stream over: its own, with a pool as large as the number
        of blobs read at once can be (the client's pool keeps 10 connections and warns at
        every one it discards)."""
        with self._stream_lock:
            if self._streams is None:
                session = AuthorizedSession(self._client._credentials)
                adapter = requests.adapters.HTTPAdapter(pool_maxsize=_STREAM_POOL)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                self._streams = session
            return self._streams

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[GcsBlobWriter]:
        writer = GcsBlobWriter(self)
        try:
            yield writer
        finally:
            writer.abandon()

    def put_blob(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        self._create(self._blob_for(digest), data)
        return digest

    def delete_blob(self, digest: Digest) -> None:
        self._delete(self._blob_for(digest))

    def list_blobs(self) -> Iterator[tuple[Digest, int, float]]:
        prefix = self._names + "blobs/sha256/"
        fields = "items(name,size,updated,customTime),nextPageToken"
        for blob in self._iter_objects(prefix, fields):
            hex_ = blob.name[len(prefix) :]
            if _HEX.fullmatch(hex_):
                yield Digest(hex_), int(blob.size or 0), _mtime(blob)

    def blob_delivery(self, digest: Digest, url_ttl: int | None) -> Redirect | None:
        """A redirect to a V4 signed URL when asked and the credentials can sign, else None
        (the registry streams)."""
        if url_ttl is None:
            return None
        url = self.signed_blob_url(digest, url_ttl)
        return Redirect(url) if url is not None else None

    def signed_blob_url(self, digest: Digest, ttl_seconds: int) -> str | None:
        """A V4 signed GET URL, or None when the credentials cannot sign (gcs_signing)."""
        if not 0 < ttl_seconds <= _MAX_SIGNED_TTL:
            raise InvalidInput(f"signed URL lifetime must be 1..{_MAX_SIGNED_TTL} s")
        try:
            return self._signer.sign(self._blob_for(digest), ttl_seconds)
        except LIBRARY_ERRORS as exc:
            raise StorageError(f"cannot sign a URL for {digest}: {exc}") from exc

    # metadata

    def read(self, key: str) -> bytes | None:
        blob = self._blob(check_key(key))
        try:
            return bytes(blob.download_as_bytes(retry=self.retry))
        except api_exceptions.NotFound:
            return None
        except LIBRARY_ERRORS as exc:
            fail(f"reading {self._where(key)}", exc)

    def write(self, key: str, data: bytes) -> None:
        blob = self._blob(check_key(key))
        try:
            # One request, so readers see the old or the new object, never a mix. Retrying an
            # unconditional write is safe here: every attempt carries the same bytes, and a
            # concurrent writer's value may win either way (last writer wins).
            blob.upload_from_string(data, content_type="application/octet-stream", retry=self.retry)
        except LIBRARY_ERRORS as exc:
            fail(f"writing {self._where(key)}", exc)

    def write_unless(self, key: str, data: bytes, keep: Callable[[bytes], bool]) -> bool:
        # Read the object and its generation, then write only over that generation (0:
        # only if it still does not exist); a writer in between makes us look again.
        name = self._names + check_key(key)
        for _ in range(CONDITIONAL_ATTEMPTS):
            current = self._get(name)
            generation = 0
            if current is not None:
                try:
                    value = current.download_as_bytes(
                        if_generation_match=current.generation, retry=self.retry
                    )
                except (api_exceptions.NotFound, api_exceptions.PreconditionFailed):
                    continue  # replaced or deleted since we looked it up
                except LIBRARY_ERRORS as exc:
                    fail(f"reading {self._where(key)}", exc)
                if keep(bytes(value)):
                    return False
                generation = current.generation
            try:
                self._blob(check_key(key)).upload_from_string(
                    data,
                    content_type="application/octet-stream",
                    if_generation_match=generation,
                    retry=self.retry,  # conditional: a retry cannot overwrite another writer
                )
                return True
            except api_exceptions.PreconditionFailed:
                continue
            except LIBRARY_ERRORS as exc:
                fail(f"writing {self._where(key)}", exc)
        raise StorageError(f"{self._where(key)} kept changing while it was written")

    def delete(self, key: str) -> None:
        self._delete(self._blob(check_key(key)))

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix), sorted."""
        check_prefix(prefix)
        start = len(self._names)
        objects = self._iter_objects(self._names + prefix, "items(name),nextPageToken")
        names = [b.name[start:] for b in objects]
        # Eager, so errors surface at the call; skips objects that are not valid keys.
        return iter(sorted(n for n in names if is_key(n)))

    # garbage collection (the gc package doc has the protocol)

    def touch_blob(self, digest: Digest) -> int | None:
        blob = self._blob_for(digest)
        blob.custom_time = datetime.datetime.now(datetime.UTC)
        try:
            # Only customTime goes in the PATCH; the answer is the whole resource (size).
            blob.patch(retry=self.retry)
        except api_exceptions.NotFound:
            return None
        except api_exceptions.BadRequest:
            # customTime never goes back: another writer, whose clock is ahead, touched it
            # later than our now. Touched it is; its size is what we need.
            found = self._get(blob.name)
            return int(found.size or 0) if found is not None else None
        except LIBRARY_ERRORS as exc:
            fail(f"touching {self._where(blob_key(digest))}", exc)
        return int(blob.size or 0)

    def delete_blob_if_stale(self, digest: Digest, cutoff: float) -> str:
        name = self._blob_for(digest).name
        blob = self._get(name)
        if blob is None:
            return "missing"
        if _mtime(blob) >= cutoff:
            return "fresh"
        checkpoint("gc.delete-checked", digest=digest)
        try:
            # Only this generation and metageneration: a touch since our read made a new
            # metageneration (a rewrite a new generation), and this fails.
            blob.delete(
                if_generation_match=blob.generation,
                if_metageneration_match=blob.metageneration,
                retry=self.retry,
            )
        except api_exceptions.PreconditionFailed:
            return "fresh"
        except api_exceptions.NotFound:
            return "missing"
        except LIBRARY_ERRORS as exc:
            fail(f"deleting {gs(blob)}", exc)
        return "deleted"

    def blob_mtime(self, digest: Digest) -> float | None:
        blob = self._get(self._blob_for(digest).name)
        return _mtime(blob) if blob is not None else None

    def recover_trash(self, cutoff: float) -> int:
        """Nothing to recover: a deletion is one request, never left half done."""
        return 0

    def count_stale_uploads(self, older_than: float) -> int:
        return sum(1 for _blob in self._stale_uploads(older_than))

    def purge_stale_uploads(self, older_than: float) -> int:
        """Delete temporary upload objects (crashed writers) older than ``older_than`` s.

        ``older_than`` must exceed the longest upload: a live writer's object is deleted too.
        """
        removed = 0
        for blob in self._stale_uploads(older_than):
            self._delete(blob)
            removed += 1
        return removed

    def _stale_uploads(self, older_than: float) -> Iterator[storage.Blob]:
        cutoff = time.time() - older_than
        for blob in self._iter_objects(self._names + "uploads/", None):
            created = blob.time_created or blob.updated
            if created is not None and created.timestamp() < cutoff:
                yield blob

    def close(self) -> None:
        if self._streams is not None:
            self._streams.close()
        if self._own_client:
            self._client.close()

    def __repr__(self) -> str:
        return f"GcsStorage({self.url!r})"

    # requests, each translating library errors

    def _get(self, name: str) -> storage.Blob | None:
        try:
            return self._bucket.get_blob(name, retry=self.retry)
        except LIBRARY_ERRORS as exc:
            fail(f"looking up gs://{self._bucket.name}/{name}", exc)

    def _create(self, blob: storage.Blob, data: bytes) -> None:
        """Create ``blob`` with ``data`` unless it exists (then it holds the same content)."""
        try:
            # Create-only makes the retry safe: a retried request that finds the object
            # created by its own earlier attempt gets 412, which is success.
            blob.upload_from_string(
                data,
                content_type="application/octet-stream",
                if_generation_match=0,
                retry=self.retry,
            )
        except api_exceptions.PreconditionFailed:
            pass
        except LIBRARY_ERRORS as exc:
            fail(f"uploading {gs(blob)}", exc)

    def _rewrite(self, source: storage.Blob, target: storage.Blob) -> None:
        """Server-side copy ``source`` to a new ``target``; an existing target is success."""
        token: str | None = None
        try:
            while True:
                # Large or cross-location objects take several calls; the token resumes.
                token, _, _ = target.rewrite(
                    source, token=token, if_generation_match=0, retry=self.retry
                )
                if token is None:
                    return
        except api_exceptions.PreconditionFailed:
            return
        except LIBRARY_ERRORS as exc:
            fail(f"publishing {gs(target)}", exc)

    def _delete(self, blob: storage.Blob) -> None:
        try:
            blob.delete(retry=self.retry)
        except api_exceptions.NotFound:
            pass  # absent is fine, also when a retried delete finds its own earlier success
        except LIBRARY_ERRORS as exc:
            fail(f"deleting {gs(blob)}", exc)

    def _iter_objects(self, prefix: str, fields: str | None) -> Iterator[storage.Blob]:
        """Objects under ``prefix`` in name order, page by page."""
        try:
            yield from self._client.list_blobs(
                self._bucket, prefix=prefix, fields=fields, retry=self.retry
            )
        except LIBRARY_ERRORS as exc:
            fail(f"listing gs://{self._bucket.name}/{prefix}", exc)


class _Reader(io.BufferedIOBase):
    """A committed blob's bytes from one streaming GET, read as the caller asks and never
    ahead: memory per open blob is what one ``read`` returns, whatever the blob's size (a
    ``BlobReader`` buffers a ``chunk_size`` range per reader: 8 MiB a concurrent stream).

    A dropped connection is reopened at the current offset through ``retry``; a second drop
    with no byte read in between is an error. ``seek`` closes the response; the next read
    asks from the new offset. Errors become ``StorageError`` (``NotFound`` when the object
    is gone)."""

    def __init__(self, storage: GcsStorage, blob: storage.Blob) -> None:
        super().__init__()
        self._session = storage.stream_session()
        # The generation pins every request to the object looked up, as BlobReader did.
        self._url = blob._get_download_url(storage._client)
        self._size = int(blob.size or 0)
        self._retry = storage.retry
        self._where = gs(blob)
        self._position = 0
        self._response: requests.Response | None = None
        self._failed_at: int | None = None

    def read(self, size: int | None = -1) -> bytes:
        wanted = self._size - self._position
        if size is not None and size >= 0:
            wanted = min(wanted, size)
        while wanted > 0:
            try:
                data = self._body().raw.read(wanted, decode_content=False)
            except api_exceptions.NotFound as exc:
                raise NotFound(f"{self._where} disappeared while being read") from exc
            except _STREAM_ERRORS as exc:
                self._dropped(exc)
                continue
            if not data:
                self._dropped(ConnectionError("the response ended early"))
                continue
            self._position += len(data)
            return bytes(data)
        return b""

    def _body(self) -> requests.Response:
        if self._response is None:
            try:
                self._response = self._retry(self._open)()
            except api_exceptions.NotFound:
                raise
            except LIBRARY_ERRORS as exc:
                fail(f"reading {self._where}", exc)
        return self._response

    def _open(self) -> requests.Response:
        headers = {"Range": f"bytes={self._position}-{self._size - 1}"}
        response = self._session.get(
            self._url, headers=headers, stream=True, timeout=_STREAM_TIMEOUT
        )
        if response.status_code == 206 or (response.status_code == 200 and not self._position):
            return response
        try:
            raise api_exceptions.from_http_response(response)
        finally:
            response.close()

    def _dropped(self, exc: BaseException) -> None:
        self._close_response()
        if self._failed_at == self._position:
            fail(f"reading {self._where} at byte {self._position}", exc)
        self._failed_at = self._position

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        position = max(0, min(base + offset, self._size))
        if position != self._position:
            self._close_response()
            self._position, self._failed_at = position, None
        return position

    def tell(self) -> int:
        return self._position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._close_response()
        super().close()


# helpers


def _normalise_prefix(prefix: str) -> str:
    """``"a/b"`` or ``"/a/b/"`` → ``"a/b/"``; ``""`` → ``""``. Rejects empty and dot parts."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    if len(stripped) > 512 or not all(_PREFIX_PART.fullmatch(p) for p in stripped.split("/")):
        raise InvalidInput(f"invalid GCS storage prefix: {prefix[:200]!r}")
    return stripped + "/"
