"""Blob responses: ``sendfile`` for local files, 307 to a signed URL, or a stream.

- Filesystem storage: the kernel copies the file to the socket (``loop.sendfile``), the
  same path as aiohttp's ``FileResponse``, without its extras that a registry must not have
  (``.gz`` siblings served with ``Content-Encoding``, mtime ETags, 304s on dates). Range
  is parsed by ``ranges``, so errors keep the JSON envelope.
- GCS with signing credentials: GET answers 307 to a short-lived V4 signed GET URL, after
  checking the blob exists (an unknown digest gets our JSON 404, not storage XML). HEAD is
  answered here: a signed URL is bound to its method, and it saves a round trip. Storage
  serves Range itself; clients keep the header across the redirect.
- Otherwise the blob is streamed through, read in the storage pool in small pieces, never
  ahead of the socket; a storage failure once the body has begun aborts the connection.

Blobs are not re-hashed when served: they were verified when committed
(docs/architecture.md#storage-layout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import BinaryIO

from aiohttp import web

from niximage_core.digest import Digest
from niximage_core.storage.base import Delivery, LocalFile, Redirect
from niximage_registry import ranges
from niximage_registry.content import Content, LocalBlob, TtlCache
from niximage_registry.errors import Code, RegistryError

STREAM_PIECE = 128 << 10
"""A streamed read: a stream holds about two (one being sent, one in the transport)."""
OCTET_STREAM = "application/octet-stream"

log = logging.getLogger(__name__)


def blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Content-Type": OCTET_STREAM,
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        # Content-addressed: a blob never changes under its name.
        "Cache-Control": "max-age=31536000",
    }


def select_range(request: web.Request, size: int) -> ranges.ByteRange | None:
    try:
        return ranges.parse(request.headers.get("Range"), size)
    except ranges.Unsatisfiable as exc:
        raise RegistryError(
            Code.RANGE_INVALID, str(exc), headers={"Content-Range": f"bytes */{size}"}
        ) from None


class SendfileResponse(web.StreamResponse):
    """A whole file or one slice of it, written by ``sendfile``; closes the file."""

    def __init__(
        self,
        blob: LocalBlob,
        selected: ranges.ByteRange | None,
        headers: dict[str, str],
        on_sent: Callable[[int], None],
    ) -> None:
        super().__init__(status=206 if selected else 200, headers=headers)
        self._blob = blob
        self._offset = selected.start if selected else 0
        self._count = selected.length if selected else blob.size
        self._on_sent = on_sent
        self.content_length = self._count
        if selected:
            self.headers["Content-Range"] = selected.content_range()

    async def prepare(self, request: web.BaseRequest) -> object:
        try:
            writer = await super().prepare(request)
            if request.method == "HEAD" or self._count == 0:
                return writer
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            loop = asyncio.get_running_loop()
            # fallback=True: TLS transports (and loops without native sendfile) copy chunks.
            await loop.sendfile(transport, self._blob.file, self._offset, self._count)
            self._on_sent(self._count)
            await super().write_eof()
            return writer
        finally:
            self._blob.file.close()


class Blobs:
    """Answers blob GET and HEAD for one storage."""

    def __init__(
        self,
        content: Content,
        signed_url_ttl: int,
        redirect: bool,
        on_sent: Callable[[int], None],
        on_redirect: Callable[[], None],
    ) -> None:
        self._content = content
        self._url_ttl = signed_url_ttl if redirect else None
        # A signed URL stays usable for its TTL; reuse it for half of that (signing is RSA
        # work, or a call to the IAM Credentials API).
        self._deliveries: TtlCache[Digest, Delivery] = TtlCache(signed_url_ttl / 2, 10_000)
        self._on_sent = on_sent
        self._on_redirect = on_redirect

    async def head(self, digest: Digest) -> web.StreamResponse:
        size = await self._content.blob_size(digest)
        if size is None:
            raise unknown(digest)
        response = web.StreamResponse(headers=blob_headers(digest))
        response.content_length = size
        return response

    async def get(self, request: web.Request, digest: Digest) -> web.StreamResponse:
        delivery = await self._delivery(digest)
        if isinstance(delivery, LocalFile):
            blob = await self._content.open_file(delivery.path, digest)
            if blob is None:
                raise unknown(digest)
            try:
                selected = select_range(request, blob.size)
            except RegistryError:
                blob.file.close()
                raise
            return SendfileResponse(blob, selected, blob_headers(digest), self._on_sent)
        size = await self._content.blob_size(digest)
        if size is None:
            raise unknown(digest)
        if isinstance(delivery, Redirect):
            self._on_redirect()
            return web.Response(
                status=307,
                headers={"Location": delivery.url, "Docker-Content-Digest": str(digest)},
            )
        return await self._stream(request, digest, size)

    async def _delivery(self, digest: Digest) -> Delivery:
        """The storage's way to hand out this blob (cached: see ``__init__``)."""
        found = self._deliveries.get(digest)
        if found is None:
            storage = self._content.storage
            found = await self._content.run(storage.blob_delivery, digest, self._url_ttl)
            if found is not None:
                self._deliveries.put(digest, found)
        return found

    async def _stream(self, request: web.Request, digest: Digest, size: int) -> web.StreamResponse:
        selected = select_range(request, size)
        stream = await self._content.run(self._content.storage.open_blob, digest)
        try:
            response = web.StreamResponse(
                status=206 if selected else 200, headers=blob_headers(digest)
            )
            count = selected.length if selected else size
            response.content_length = count
            if selected:
                response.headers["Content-Range"] = selected.content_range()
                await self._content.run(stream.seek, selected.start)
            await response.prepare(request)
            await self._send(request, response, stream, digest, count)
            return response
        finally:
            with contextlib.suppress(Exception):
                await self._content.run(stream.close)

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        stream: BinaryIO,
        digest: Digest,
        count: int,
    ) -> None:
        """The body, one small piece at a time, the next read only once aiohttp took the
        last (``write`` waits for the socket once 64 KiB are buffered).

        The status line and headers are out: an error can no longer be a response (the
        middleware's would land inside the body, and the client wait for the rest). A
        failure aborts the connection, so the client sees a short read at once."""
        sent = 0
        while sent < count:
            try:
                piece = await self._content.run(stream.read, min(STREAM_PIECE, count - sent))
            except Exception as exc:  # storage failed: RegistryError(UNAVAILABLE), or a bug
                _abort(
                    request, f"blob {digest} after {sent} of {count} bytes", exc.__cause__ or exc
                )
                return
            if not piece:
                _abort(
                    request, f"blob {digest} after {sent} of {count} bytes", "storage ended early"
                )
                return
            try:
                await response.write(piece)
            except ConnectionResetError:
                return  # the client went away; aiohttp closes the connection
            sent += len(piece)
            self._on_sent(len(piece))
        await response.write_eof()


def _abort(request: web.Request, what: str, cause: object) -> None:
    log.warning("aborted the response to %s %s: %s", request.method, what, cause)
    if request.transport is not None:
        request.transport.abort()


def unknown(digest: Digest) -> RegistryError:
    return RegistryError(Code.BLOB_UNKNOWN, f"blob {digest} is unknown", {"digest": str(digest)})
