"""Distribution error codes and the spec's JSON envelope: the one place errors become HTTP.

Handlers *raise* a ``RegistryError`` (go-containerregistry's ``regError``, distribution's
``errcode``); ``response`` renders it. Every code carries its HTTP status, so a malformed
digest cannot turn into a 500 by accident. HEAD responses carry the status and headers only.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

JSON_TYPE = "application/json"


class Code(enum.Enum):
    """``(status, default message)`` per code: the distribution-spec list, plus distribution's
    own RANGE_INVALID, PAGINATION_NUMBER_INVALID, UNAVAILABLE (a storage outage) and UNKNOWN
    (a bug: the only 500), plus three for requests the HTTP parser refuses (runner.py): the
    spec has no code for a request that is not valid HTTP, and UNSUPPORTED means an operation
    this registry does not do (push, delete, an unknown method)."""

    BLOB_UNKNOWN = (404, "blob unknown to registry")
    DIGEST_INVALID = (400, "provided digest did not match uploaded content")
    MANIFEST_UNKNOWN = (404, "manifest unknown")
    NAME_INVALID = (400, "invalid repository name")
    NAME_UNKNOWN = (404, "repository name not known to registry")
    TAG_INVALID = (400, "manifest tag did not match URI")
    UNAUTHORIZED = (401, "authentication required")
    DENIED = (403, "requested access to the resource is denied")
    UNSUPPORTED = (405, "the operation is unsupported")
    TOOMANYREQUESTS = (429, "too many requests")
    RANGE_INVALID = (416, "requested range not satisfiable")
    PAGINATION_NUMBER_INVALID = (400, "invalid number of results requested")
    UNAVAILABLE = (503, "service unavailable")
    REQUEST_INVALID = (400, "malformed HTTP request")
    URI_TOO_LONG = (414, "request target too long")
    HEADERS_TOO_LARGE = (431, "request header fields too large")
    UNKNOWN = (500, "unknown error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def message(self) -> str:
        return self.value[1]


class RegistryError(Exception):
    """An error response: a code, a message for people, optional detail and headers."""

    def __init__(
        self,
        code: Code,
        message: str | None = None,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.message
        self.detail = detail
        self.status = status or code.status
        self.headers = dict(headers or {})
        super().__init__(f"{code.name}: {self.message}")


def envelope(error: RegistryError) -> bytes:
    """``{"errors": [{"code", "message", "detail"}]}`` as the spec requires."""
    item: dict[str, Any] = {"code": error.code.name, "message": error.message}
    if error.detail is not None:
        item["detail"] = error.detail
    return json.dumps({"errors": [item]}).encode()


def response(error: RegistryError) -> web.Response:
    """The HTTP response for ``error`` (for HEAD: the same headers, no body)."""
    body = envelope(error)
    headers = {**error.headers, "Content-Type": JSON_TYPE}
    # For HEAD, aiohttp sends the Content-Length of the body but not the body itself.
    return web.Response(status=error.status, body=body, headers=headers)


def unsupported(allow: str) -> RegistryError:
    """405 for push, delete and every other method: this registry is pull-only."""
    return RegistryError(
        Code.UNSUPPORTED,
        "this registry is read-only: push and delete are not supported",
        headers={"Allow": allow},
    )
