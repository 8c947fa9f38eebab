"""An ``AppRunner`` whose protocol-level errors are JSON too.

Some requests never reach the application: aiohttp's HTTP parser refuses them first
(methods it does not know, header lines over 8190 bytes, malformed HTTP) and answers
with its own plain-text 400. Here those answers become the spec's JSON envelope, with the
same status, and the connection is closed as before. This relies on two aiohttp internals
(``AppRunner._make_server`` and ``Server._kwargs``), checked by tests/registry.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import HttpProcessingError

from niximage_registry import errors
from niximage_registry.errors import Code, RegistryError


class _JsonErrorsHandler(web_protocol.RequestHandler):
    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A request the HTTP parser refused is the client's fault: one line at WARNING,
        no traceback (a flood of bad requests must not flood the log). Anything else is
        ours, with its traceback."""
        error = kw.get("exc_info")
        if isinstance(error, HttpProcessingError):
            remote = args[1] if len(args) > 1 else "?"
            message = str(error.message or type(error).__name__).splitlines()[0][:200]
            self.logger.warning("refused a malformed request from %s: %s", remote, message)
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
        code = Code.UNKNOWN if status >= 500 else Code.UNSUPPORTED
        text = "bad request: the HTTP parser refused it" if status < 500 else None
        response = errors.response(RegistryError(code, text, status=status))
        response.force_close()
        return response


class _JsonErrorsServer(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorsRunner(web.AppRunner):
    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer  # same state, one method more
        return server
