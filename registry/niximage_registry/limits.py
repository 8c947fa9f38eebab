"""Connection limits: idle and half-open connections must not use up the process's file
descriptors (issue 13: 600 half-open connections under a limit of 512 made every request
time out with ``Too many open files``).

- Header timeout: a connection that has not sent complete request headers within
  ``header_timeout`` s (from its start, or from the first byte of a later request) is closed.
- Idle timeout: a connection waiting for its next request is closed after ``idle_timeout`` s
  (aiohttp's keep-alive timeout, which the runner sets; aiohttp's default is an hour).
- Bounds: ``max_per_client`` connections per client address, ``max_connections`` in all.
- Head size: at most ``max_header_bytes`` of request line and headers (aiohttp bounds each
  line and the number of headers, not their sum: 128 lines of 8 KiB are 1 MiB a request).

Past a bound the new connection evicts the *oldest idle* connection (one waiting for a
request or for the rest of its headers) of that address, or of all; only when every counted
connection is busy answering a request is the new one closed at once. Why evict rather than
refuse: refusing newcomers hands the server to whoever filled the table, and half-open
connections are cheap to make; 600 of them would lock every real client out until the header
timeout. Dropping an idle connection costs nothing worth keeping: a half-open one has sent
nothing usable, and HTTP clients retry an idempotent request on a keep-alive connection the
server closed. A busy connection is never dropped for a newcomer.

Descriptors: asyncio accepts up to ``backlog`` sockets in one loop pass before any of them
reaches the gate, and a busy connection may hold a second descriptor (the blob file it sends,
or its storage connection). So the default total is ``(RLIMIT_NOFILE - reserve - backlog) / 2``
with a fixed reserve for the process's own files, the storage pool and logs, and the listen
backlog is derived from the limit too (``listen_backlog``).

Each refusal class is logged as one WARNING line at most every ``LOG_INTERVAL`` s, with a
count, never with a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web_protocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD

log = logging.getLogger("niximage.registry.connections")

RESERVE = 64
"""Descriptors kept for the process itself: stdio, the event loop, the listening socket,
log files, the storage pool's connections."""
MAX_BACKLOG = 1024
LOG_INTERVAL = 10.0

_MESSAGES = {
    "refused-client": "closed new connections at once: their client holds "
    "--max-connections-per-client connections, none idle",
    "refused-total": "closed new connections at once: --max-connections reached, none idle",
    "evicted-client": "closed the oldest idle connections of clients at "
    "--max-connections-per-client to admit their new ones",
    "evicted-total": "closed the oldest idle connections to admit new ones (--max-connections)",
    "header-timeout": "closed connections without complete request headers after --header-timeout",
    "malformed": "refused requests the HTTP parser could not accept",
}


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE of this process (unlimited counts as 2**20)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def listen_backlog(nofile: int) -> int:
    """The listen backlog, which is also how many sockets asyncio accepts in one pass."""
    return min(MAX_BACKLOG, max(16, (nofile - RESERVE) // 8))


def default_max_connections(nofile: int) -> int:
    """Two descriptors per connection, after the reserve and one accept burst."""
    return max(8, (nofile - RESERVE - listen_backlog(nofile)) // 2)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 0
    """0: ``default_max_connections`` of this process's descriptor limit."""
    max_per_client: int = 256
    max_header_bytes: int = 32 * 1024
    backlog: int = 0
    """The listen backlog; 0: ``listen_backlog`` of the descriptor limit."""

    def resolved(self, nofile: int | None = None) -> ConnectionLimits:
        """These limits with the total and backlog derived, the per-client bound within."""
        nofile = nofile or descriptor_limit()
        total = self.max_connections or default_max_connections(nofile)
        per_client = min(self.max_per_client or total, total)
        return dataclasses.replace(
            self,
            max_connections=total,
            max_per_client=per_client,
            backlog=self.backlog or listen_backlog(nofile),
        )


class RefusalLog:
    """One WARNING line per refusal class at most every ``interval`` s, counting the rest."""

    def __init__(
        self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def note(self, kind: str, client: str, detail: str = "") -> None:
        count = self._counts.get(kind, 0) + 1
        now = self._clock()
        if now - self._last.get(kind, -math.inf) < self._interval:
            self._counts[kind] = count
            return
        self._last[kind], self._counts[kind] = now, 0
        suffix = f": {detail}" if detail else ""
        log.warning("%s: %d, the last from %s%s", _MESSAGES[kind], count, client, suffix)


class Connection(Protocol):
    client: str

    def evict(self) -> None: ...


class ConnectionGate:
    """Counts a server's connections per client and in all; tracks which are idle, oldest
    first (dicts keep insertion order), so an eviction is O(1)."""

    def __init__(self, limits: ConnectionLimits, refusals: RefusalLog | None = None) -> None:
        self.limits = limits.resolved()
        self.refusals = refusals or RefusalLog()
        self._open: dict[Connection, str] = {}
        self._per_client: dict[str, int] = {}
        self._idle: dict[Connection, None] = {}
        self._idle_of: dict[str, dict[Connection, None]] = {}

    def admit(self, conn: Connection) -> bool:
        """Count ``conn`` (idle) if a bound allows it, evicting an idle one if need be."""
        client = conn.client
        full = self._per_client.get(client, 0) >= self.limits.max_per_client
        if full and not self._evict(self._idle_of.get(client, {}), "evicted-client", client):
            self.refusals.note("refused-client", client)
            return False
        full = len(self._open) >= self.limits.max_connections
        if full and not self._evict(self._idle, "evicted-total", client):
            self.refusals.note("refused-total", client)
            return False
        self._open[conn] = client
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self.idle(conn)
        return True

    def idle(self, conn: Connection) -> None:
        """``conn`` waits for a request: evictable, after those idle longer."""
        client = self._open.get(conn)
        if client is not None:
            self.busy(conn)  # to the end of the order
            self._idle[conn] = None
            self._idle_of.setdefault(client, {})[conn] = None

    def busy(self, conn: Connection) -> None:
        client = self._open.get(conn)
        if client is None:
            return
        self._idle.pop(conn, None)
        idle_of = self._idle_of.get(client)
        if idle_of is not None:
            idle_of.pop(conn, None)
            if not idle_of:
                del self._idle_of[client]

    def forget(self, conn: Connection) -> None:
        """``conn`` is closed (idempotent)."""
        self.busy(conn)
        client = self._open.pop(conn, None)
        if client is not None:
            left = self._per_client[client] - 1
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]

    def __len__(self) -> int:
        return len(self._open)

    def _evict(self, pool: dict[Connection, None], kind: str, client: str) -> bool:
        oldest = next(iter(pool), None)
        if oldest is None:
            return False
        self.forget(oldest)
        oldest.evict()
        self.refusals.note(kind, client)
        return True


class HeadTooLarge(HttpProcessingError):
    """The request line and headers exceed ``max_header_bytes``."""

    code = 431


@dataclass(frozen=True)
class Head:
    """What was seen of a request head: tells a refused request's cause (runner.py)."""

    start: bytes = b""
    """Its first bytes (a method token, or garbage such as a TLS hello)."""
    line_length: int = 0
    """Bytes up to its first line end, or all bytes seen when no line ended."""


class LimitedHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler under a ``ConnectionGate`` and a header timeout.

    Relies on aiohttp internals (``_request_count``, ``_messages``, ``_waiter``, ``_close``,
    ``_ErrInfo``), checked by tests/registry/test_limits.py.
    """

    def __init__(self, manager: Any, *, gate: ConnectionGate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.gate = gate
        self.client = ""
        self.head = Head()
        """The head of the last request parsed (or refused) on this connection."""
        self._busy = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_start = b""
        self._line_length = 0
        self._line_ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) else str(peer or "local")
        if not self.gate.admit(self):
            self.force_close()
            return
        self._start_header_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_clock()
        self.gate.forget(self)
        super().connection_lost(exc)

    def evict(self) -> None:
        self._stop_header_clock()
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        self._see(data)
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a complete head (or a parser error)
            self._head_complete()
            self._check_parsed(self._request_count - before)
            return
        if self._head_bytes > self.gate.limits.max_header_bytes:
            self._refuse_head()
        elif data and not self._busy and self._header_timer is None:
            self._start_header_clock()

    async def finish_response(
        self, request: Any, resp: Any, start_time: float | None
    ) -> tuple[Any, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if not self._messages:  # nothing pipelined: waiting for the next request
                self._busy = False
                self.gate.idle(self)
                if self._head_bytes:  # it began while we were answering
                    self._start_header_clock()

    def _see(self, data: bytes) -> None:
        """Account for ``data`` as part of the request head being read. With pipelined
        requests in one read this over-counts the new head by what the old one left: the
        bound is on memory, it need not be exact."""
        if not self._head_bytes:
            self._head_start = bytes(data[:32])
        self._head_bytes += len(data)
        if not self._line_ended:
            end = data.find(b"\n")
            self._line_ended = end >= 0
            self._line_length += end if end >= 0 else len(data)

    def _head_complete(self) -> None:
        self.head = Head(self._head_start, self._line_length)
        self._head_bytes, self._head_start = 0, b""
        self._line_length, self._line_ended = 0, False
        self._stop_header_clock()
        self._busy = True
        self.gate.busy(self)

    def _check_parsed(self, count: int) -> None:
        """Refuse the first of the ``count`` requests just parsed whose head is too large,
        and drop those after it."""
        limit = self.gate.limits.max_header_bytes
        parsed = list(self._messages)[-count:]
        for index, (message, _payload) in enumerate(parsed):
            if isinstance(message, RawRequestMessage) and _head_size(message) > limit:
                for _ in range(count - index):
                    self._messages.pop()
                self._refuse_head()
                return

    def _refuse_head(self) -> None:
        """Answer 431 through aiohttp's parser-error path (runner.py renders it) and read
        nothing more from this connection."""
        limit = self.gate.limits.max_header_bytes
        error = HeadTooLarge(message=f"request line and headers exceed {limit} bytes")
        self._messages.append(
            (web_protocol._ErrInfo(status=431, exc=error, message=error.message), EMPTY_PAYLOAD)
        )
        self._request_count += 1
        self._head_complete()
        self._close = True  # data_received ignores the rest; the response closes
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _start_header_clock(self) -> None:
        self._stop_header_clock()
        timeout = self.gate.limits.header_timeout
        if timeout > 0:
            self._header_timer = self._loop.call_later(timeout, self._headers_late)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self._busy and self.transport is not None:
            self.gate.refusals.note("header-timeout", self.client)
            self.gate.forget(self)
            self.force_close()


def _head_size(message: RawRequestMessage) -> int:
    """The bytes of a parsed request head (request line, headers, line ends)."""
    line = len(message.method) + len(message.path) + len("  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in message.raw_headers)
