"""Storage in a Google Cloud Storage bucket (DESIGN.md §3), under an optional name prefix.

    <prefix>blobs/sha256/<hex>        committed blobs, immutable
    <prefix>layers|builds|tags|gc/…   metadata objects
    <prefix>uploads/<uuid>            large blobs being written; never listed or read

How a blob becomes visible only complete and verified:

- Up to half a chunk stays in memory. If the writer commits before that (configs,
  manifests, small layers), the bytes go in one upload straight to the final name with
  ``if_generation_match=0``: a create-only request, complete or absent, safe to retry.
- Beyond, the bytes stream to ``uploads/<uuid>`` with a resumable upload, one ``chunk_size``
  request at a time (memory stays bounded: about two chunks, the library's buffer and the
  request body). ``commit`` checks the sha256, finalises the upload (the library checks the
  server's crc32c against the bytes sent), then a server-side rewrite creates the final
  name, again create-only, and the temporary object is deleted.
- A mismatch, an error or leaving the ``with`` block abandons the upload: nothing appears
  at the final name. A crash may leave an object in ``uploads/`` (``purge_stale_uploads``,
  or a bucket lifecycle rule on that prefix).

An existing final object (HTTP 412 on the create-only request) means another writer
published the same content first: a success. Every call goes through one ``Retry``
(backoff on 429/5xx and connection errors); library exceptions become ``StorageError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO, NoReturn, cast

import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage import exceptions as media_exceptions
from google.cloud.storage.fileio import BlobReader, BlobWriter
from google.cloud.storage.retry import DEFAULT_RETRY

from niximage_builder.digest import Digest
from niximage_builder.errors import InvalidInput, NotFound, StorageError
from niximage_builder.storage.base import check_key, check_prefix, is_key
from niximage_builder.storage.gcs_signing import UrlSigner

log = logging.getLogger(__name__)

# 8 MiB: few requests per layer, bounded memory with several layers uploading in parallel.
DEFAULT_CHUNK_SIZE = 8 << 20
_CHUNK_MULTIPLE = 256 << 10  # resumable uploads require multiples of 256 KiB
_MAX_SIGNED_TTL = 7 * 24 * 3600  # the V4 signing limit
_HEX = re.compile(r"[a-f0-9]{64}")
_PREFIX_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# Everything the client library raises for a failed request, after its own retries.
_LIBRARY_ERRORS = (
    api_exceptions.GoogleAPIError,  # HTTP errors and RetryError (retry deadline exceeded)
    auth_exceptions.GoogleAuthError,  # missing or unusable credentials
    media_exceptions.InvalidResponse,  # resumable upload / download protocol errors
    media_exceptions.DataCorruption,  # checksum mismatch between client and server
    requests.RequestException,
    ConnectionError,
)
_EMULATOR_PROJECT = "niximage-emulator"


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


class GcsStorage:
    """A ``Storage`` (and ``SignedBlobs``) in ``gs://bucket/prefix``; see the module doc."""

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
        # The blob now carries its generation and size: reads are pinned to this object.
        reader = BlobReader(blob, chunk_size=self.chunk_size, retry=self.retry)
        return cast(BinaryIO, _Reader(reader, _gs(blob)))

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[_GcsBlobWriter]:
        writer = _GcsBlobWriter(self)
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
        for blob in self._iter_objects(prefix, "items(name,size,updated),nextPageToken"):
            hex_ = blob.name[len(prefix) :]
            if _HEX.fullmatch(hex_):
                mtime = blob.updated.timestamp() if blob.updated else 0.0
                yield Digest(hex_), int(blob.size or 0), mtime

    def signed_blob_url(self, digest: Digest, ttl_seconds: int) -> str | None:
        """A V4 signed GET URL, or None when the credentials cannot sign (gcs_signing)."""
        if not 0 < ttl_seconds <= _MAX_SIGNED_TTL:
            raise InvalidInput(f"signed URL lifetime must be 1..{_MAX_SIGNED_TTL} s")
        try:
            return self._signer.sign(self._blob_for(digest), ttl_seconds)
        except _LIBRARY_ERRORS as exc:
            raise StorageError(f"cannot sign a URL for {digest}: {exc}") from exc

    # metadata

    def read(self, key: str) -> bytes | None:
        blob = self._blob(check_key(key))
        try:
            return bytes(blob.download_as_bytes(retry=self.retry))
        except api_exceptions.NotFound:
            return None
        except _LIBRARY_ERRORS as exc:
            _fail(f"reading {self._where(key)}", exc)

    def write(self, key: str, data: bytes) -> None:
        blob = self._blob(check_key(key))
        try:
            # One request, so readers see the old or the new object, never a mix. Retrying an
            # unconditional write is safe here: every attempt carries the same bytes, and a
            # concurrent writer's value may win either way (last writer wins).
            blob.upload_from_string(data, content_type="application/octet-stream", retry=self.retry)
        except _LIBRARY_ERRORS as exc:
            _fail(f"writing {self._where(key)}", exc)

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

    # housekeeping

    def purge_stale_uploads(self, older_than: float) -> int:
        """Delete temporary upload objects (crashed writers) older than ``older_than`` s.

        ``older_than`` must exceed the longest upload: a live writer's object is deleted too.
        """
        cutoff = time.time() - older_than
        removed = 0
        for blob in self._iter_objects(self._names + "uploads/", None):
            created = blob.time_created or blob.updated
            if created is not None and created.timestamp() < cutoff:
                self._delete(blob)
                removed += 1
        return removed

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def __repr__(self) -> str:
        return f"GcsStorage({self.url!r})"

    # requests, each translating library errors

    def _get(self, name: str) -> storage.Blob | None:
        try:
            return self._bucket.get_blob(name, retry=self.retry)
        except _LIBRARY_ERRORS as exc:
            _fail(f"looking up gs://{self._bucket.name}/{name}", exc)

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
        except _LIBRARY_ERRORS as exc:
            _fail(f"uploading {_gs(blob)}", exc)

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
        except _LIBRARY_ERRORS as exc:
            _fail(f"publishing {_gs(target)}", exc)

    def _delete(self, blob: storage.Blob) -> None:
        try:
            blob.delete(retry=self.retry)
        except api_exceptions.NotFound:
            pass  # absent is fine, also when a retried delete finds its own earlier success
        except _LIBRARY_ERRORS as exc:
            _fail(f"deleting {_gs(blob)}", exc)

    def _iter_objects(self, prefix: str, fields: str | None) -> Iterator[storage.Blob]:
        """Objects under ``prefix`` in name order, page by page."""
        try:
            yield from self._client.list_blobs(
                self._bucket, prefix=prefix, fields=fields, retry=self.retry
            )
        except _LIBRARY_ERRORS as exc:
            _fail(f"listing gs://{self._bucket.name}/{prefix}", exc)


class _GcsBlobWriter:
    """Hashes while buffering half a chunk, then streams a resumable upload (module doc)."""

    def __init__(self, storage_: GcsStorage) -> None:
        self._storage = storage_
        self._hash = hashlib.sha256()
        self._size = 0
        self._buffer = bytearray()  # bytes not handed to the upload yet (< half a chunk)
        self._temp: storage.Blob | None = None  # the uploads/ object, once streaming
        self._upload: Any = None  # the library's resumable BlobWriter, once streaming
        self._finalised = False  # the temp object exists (upload completed)
        self._state = "open"  # open → committed | abandoned | failed
        self._cleaned = False  # abandon() ran its cleanup (it runs at most once)

    def write(self, data: bytes) -> None:
        self._check_open()
        self._hash.update(data)
        self._size += len(data)
        if self._upload is not None:
            self._send(data)
            return
        self._buffer += data
        # Hand over at half a chunk, not a full one: the library copies what it gets and
        # sends a chunk as soon as it holds one, and our copy would still be alive then.
        if len(self._buffer) > self._storage.chunk_size // 2:
            self._start_upload()
            pending, self._buffer = self._buffer, bytearray()
            self._send(pending)

    def commit(self, expected: Digest) -> None:
        self._check_open()
        actual = Digest(self._hash.hexdigest())
        if actual != expected:
            self.abandon()
            raise StorageError(
                f"digest mismatch: expected {expected}, the {self._size} bytes written hash to "
                f"{actual}; blob not stored"
            )
        final = self._storage._blob_for(expected)
        if self._upload is None:
            self._guard(self._storage._create, final, bytes(self._buffer))
        else:
            self._guard(self._finish_upload)
            assert self._temp is not None
            self._guard(self._storage._rewrite, self._temp, final)
            self._drop_temp()
        self._state = "committed"

    def abandon(self) -> None:
        """Drop everything not committed; safe to call at any time, never raises."""
        if self._state == "open":
            self._state = "abandoned"
        if self._state == "committed" or self._cleaned:
            return
        self._cleaned = True
        self._buffer = bytearray()
        if self._upload is not None and not self._finalised:
            # An unfinished resumable upload never becomes an object; cancelling is a
            # courtesy (GCS forgets abandoned sessions after a week anyway).
            with contextlib.suppress(*_LIBRARY_ERRORS, ValueError):
                self._upload.terminate()
        self._drop_temp()

    # steps

    def _start_upload(self) -> None:
        name = f"uploads/{uuid.uuid4().hex}"
        self._temp = self._storage._blob(name)
        # No precondition on the temp name (unique); the library retries chunk uploads itself.
        self._upload = _ResumableWriter(
            self._temp,
            chunk_size=self._storage.chunk_size,
            content_type="application/octet-stream",
            retry=self._storage.retry,
        )

    def _send(self, data: bytes) -> None:
        try:
            self._upload.write(data)
        except _LIBRARY_ERRORS as exc:
            self._state = "failed"
            self.abandon()
            _fail(f"uploading to {self._where_temp()} after {self._size} bytes", exc)

    def _finish_upload(self) -> None:
        try:
            self._upload.close()
        except _LIBRARY_ERRORS as exc:
            _fail(f"finishing the upload to {self._where_temp()} ({self._size} bytes)", exc)
        self._finalised = True

    def _drop_temp(self) -> None:
        if self._temp is None or not self._finalised:
            return
        temp, self._temp = self._temp, None
        try:
            self._storage._delete(temp)
        except StorageError as exc:  # the blob itself is fine; purge_stale_uploads cleans up
            log.warning("cannot delete temporary object: %s", exc)

    def _guard(self, step: Any, *args: Any) -> None:
        """Run a commit step; on failure leave nothing behind but the error."""
        try:
            step(*args)
        except BaseException:
            self._state = "failed"
            self.abandon()
            raise

    def _where_temp(self) -> str:
        return _gs(self._temp) if self._temp is not None else "a temporary object"

    def _check_open(self) -> None:
        if self._state == "failed":
            raise StorageError("blob writer failed earlier; start a new one")
        if self._state != "open":
            raise ValueError(f"blob writer is already {self._state}")


class _ResumableWriter(BlobWriter):
    """The library's resumable-upload writer, except that garbage collection never finishes it.

    ``io.IOBase.__del__`` calls ``close()``, and ``BlobWriter.close()`` sends the final chunk.
    When ``terminate()`` cannot reach the server (the very case that makes us abandon an
    upload), it leaves the writer open, and the finaliser would later complete the temporary
    object with partial data, or raise in whatever thread collects it.
    """

    def __del__(self) -> None:
        pass


class _Reader(io.BufferedIOBase):
    """A committed blob's bytes, seekable; library errors become ``StorageError``."""

    def __init__(self, reader: BlobReader, where: str) -> None:
        super().__init__()
        self._reader = reader
        self._where = where

    def read(self, size: int | None = -1) -> bytes:
        try:
            return bytes(self._reader.read(-1 if size is None else size))
        except api_exceptions.NotFound as exc:
            raise NotFound(f"{self._where} disappeared while being read") from exc
        except _LIBRARY_ERRORS as exc:
            _fail(f"reading {self._where}", exc)

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return int(self._reader.seek(offset, whence))
        except _LIBRARY_ERRORS as exc:
            _fail(f"seeking in {self._where}", exc)

    def tell(self) -> int:
        return int(self._reader.tell())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._reader.close()
        super().close()


# helpers


def _gs(blob: storage.Blob) -> str:
    return f"gs://{blob.bucket.name}/{blob.name}"


def _fail(action: str, exc: BaseException) -> NoReturn:
    raise StorageError(f"GCS: {action} failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """The useful part of a library error (RetryError wraps the last real one)."""
    if isinstance(exc, api_exceptions.RetryError) and exc.cause is not None:
        return f"gave up retrying ({exc.message}): {exc.cause}"
    return f"{type(exc).__name__}: {exc}"


def _normalise_prefix(prefix: str) -> str:
    """``"a/b"`` or ``"/a/b/"`` → ``"a/b/"``; ``""`` → ``""``. Rejects empty and dot parts."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    if len(stripped) > 512 or not all(_PREFIX_PART.fullmatch(p) for p in stripped.split("/")):
        raise InvalidInput(f"invalid GCS storage prefix: {prefix[:200]!r}")
    return stripped + "/"
