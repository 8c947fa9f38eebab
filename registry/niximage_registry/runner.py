"""An ``AppRunner`` whose protocol-level errors are JSON too, and whose connections are
bounded (``limits``).

Some requests never reach the application: aiohttp's HTTP parser refuses them first
(methods it does not know, header lines over 8190 bytes, malformed HTTP) and answers
with its own plain-text 400. Here those answers become the spec's JSON envelope with a
status and code that say what was wrong (``refusal``), and the connection is closed as
before. This relies on two aiohttp internals (``AppRunner._make_server`` and
``Server._kwargs``), checked by tests/registry.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError, LineTooLong

from niximage_registry import errors
from niximage_registry.errors import Code, RegistryError
from niximage_registry.limits import (
    ConnectionGate,
    ConnectionLimits,
    Head,
    HeadTooLarge,
    LimitedHandler,
)

# A method is a token followed by a space (RFC 9110 §9.1): "FROB /v2/" is a method this
# registry does not support; "\x16\x03\x01…" (TLS on the plain port) or NULs are garbage.
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")


def refusal(exc: BaseException | None, head: Head, max_line: int = 8190) -> RegistryError:
    """What a request the parser refused is answered: every status is a 4xx that names the
    cause, so a client (or whoever reads its log) knows what to change.

    - over-long request target → 414 URI_TOO_LONG; over-long header line, more than 128
      headers, or a head over ``--max-header-bytes`` → 431 HEADERS_TOO_LARGE;
    - a method the parser does not know → 405 UNSUPPORTED with ``Allow`` (that is what the
      code means: an operation this registry does not do);
    - anything else (a malformed request line or header, TLS on the plain port) → 400
      REQUEST_INVALID.

    aiohttp raises ``LineTooLong`` for the request line and header lines alike: the request
    line was the long one when it is longer than the parser's line limit.
    """
    detail = str(getattr(exc, "message", "") or type(exc).__name__).splitlines()[0][:200]
    if isinstance(exc, LineTooLong) and head.line_length > max_line:
        return RegistryError(Code.URI_TOO_LONG, f"request target over {max_line} bytes")
    if isinstance(exc, (LineTooLong, HeadTooLarge)) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message
    ):
        return RegistryError(Code.HEADERS_TOO_LARGE, f"request headers too large: {detail}")
    if isinstance(exc, BadHttpMethod) and _METHOD.match(head.start):
        method = head.start.split(b" ", 1)[0].decode("ascii", "replace")[:20]
        message = f"method {method} is not supported: this registry serves GET and HEAD"
        return RegistryError(Code.UNSUPPORTED, message, headers={"Allow": "GET, HEAD"})
    return RegistryError(Code.REQUEST_INVALID, f"malformed HTTP request: {detail}")


class _JsonErrorsHandler(LimitedHandler):
    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A request the HTTP parser refused is the client's fault: a rate-limited WARNING
        line, no traceback (a flood of bad requests must not flood the log). Anything else is
        ours, with its traceback."""
        error = kw.get("exc_info")
        if isinstance(error, HttpProcessingError):
            remote = args[1] if len(args) > 1 else "?"
            message = str(error.message or type(error).__name__).splitlines()[0][:200]
            self.gate.refusals.note("malformed", str(remote), message)
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if output started
        if status >= 500:
            error = RegistryError(Code.UNKNOWN)
        else:
            error = refusal(exc, self.head, self.max_line_size)
        response = errors.response(error)
        response.force_close()
        return response


class _JsonErrorsServer(web_server.Server):
    gate: ConnectionGate

    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, gate=self.gate, **self._kwargs)


class JsonErrorsRunner(web.AppRunner):
    """``limits`` bound the connections (default: ``ConnectionLimits()`` for this process's
    descriptor limit); its idle timeout is aiohttp's keep-alive timeout."""

    def __init__(
        self, app: web.Application, *, limits: ConnectionLimits | None = None, **kwargs: Any
    ) -> None:
        self.limits = (limits or ConnectionLimits()).resolved()
        kwargs.setdefault("keepalive_timeout", self.limits.idle_timeout)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer  # same state, one method more
        server.gate = ConnectionGate(self.limits)  # type: ignore[attr-defined]
        return server
