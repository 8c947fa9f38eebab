"""Writing a blob to GCS: ``GcsBlobWriter``, and how a blob becomes visible only complete and
verified.

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

Part of the GCS backend: the writer works through its ``GcsStorage``'s request helpers
(``_blob``, ``_blob_for``, ``_create``, ``_rewrite``, ``_delete``), which translate library
errors. Imports digest, errors, ``gcs_errors`` and the Google libraries; ``gcs`` (for the
type only) when type-checking.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

from google.cloud import storage
from google.cloud.storage.fileio import BlobWriter

from niximage_core.digest import Digest
from niximage_core.errors import StorageError
from niximage_core.storage.gcs_errors import LIBRARY_ERRORS, fail, gs

if TYPE_CHECKING:
    from niximage_core.storage.gcs import GcsStorage

log = logging.getLogger(__name__)


class GcsBlobWriter:
    """Hashes while buffering half a chunk, then streams a resumable upload (the module doc)."""

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

    def digest(self) -> Digest:
        return Digest(self._hash.hexdigest())

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
            with contextlib.suppress(*LIBRARY_ERRORS, ValueError):
                self._upload.terminate()
        self._drop_temp()

    # steps

    def _start_upload(self) -> None:
        name = f"uploads/{uuid.uuid4().hex}"
        self._temp = self._storage._blob(name)
        # No precondition on the temp name (unique); the library retries chunk uploads itself.
        self._upload = ResumableWriter(
            self._temp,
            chunk_size=self._storage.chunk_size,
            content_type="application/octet-stream",
            retry=self._storage.retry,
        )

    def _send(self, data: bytes) -> None:
        try:
            self._upload.write(data)
        except LIBRARY_ERRORS as exc:
            self._state = "failed"
            self.abandon()
            fail(f"uploading to {self._where_temp()} after {self._size} bytes", exc)

    def _finish_upload(self) -> None:
        try:
            self._upload.close()
        except LIBRARY_ERRORS as exc:
            fail(f"finishing the upload to {self._where_temp()} ({self._size} bytes)", exc)
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
        return gs(self._temp) if self._temp is not None else "a temporary object"

    def _check_open(self) -> None:
        if self._state == "failed":
            raise StorageError("blob writer failed earlier; start a new one")
        if self._state != "open":
            raise ValueError(f"blob writer is already {self._state}")


class ResumableWriter(BlobWriter):
    """The library's resumable-upload writer, except that garbage collection never finishes it.

    ``io.IOBase.__del__`` calls ``close()``, and ``BlobWriter.close()`` sends the final chunk.
    When ``terminate()`` cannot reach the server (the very case that makes us abandon an
    upload), it leaves the writer open, and the finaliser would later complete the temporary
    object with partial data, or raise in whatever thread collects it.
    """

    def __del__(self) -> None:
        pass
