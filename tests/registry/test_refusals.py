"""Fault 10 of issue 13 (second half): a request aiohttp's HTTP parser refuses gets a status
and code that name the cause, not 400 ``UNSUPPORTED`` (which means: an operation this
registry does not do). Raw bytes over a socket to the server with the ``niximage serve``
runner; ``refusal`` itself on the parser's own exceptions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, InvalidHeader, LineTooLong

from niximage_registry.limits import Head
from niximage_registry.runner import refusal
from tests.registry.support import Image

TLS_HELLO = bytes.fromhex("16030100f4010000f00303") + b"\x00" * 40
CASES = [
    ("unknown method", b"FROB /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", 405, "UNSUPPORTED"),
    ("long target", b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
     "URI_TOO_LONG"),
    ("long header line", b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"x" * 9000 + b"\r\n\r\n", 431,
     "HEADERS_TOO_LARGE"),
    ("too many headers", b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % n for n in range(200))
     + b"\r\n", 431, "HEADERS_TOO_LARGE"),
    ("bad version", b"GET /v2/ HTTP/9.9x\r\nHost: x\r\n\r\n", 400, "REQUEST_INVALID"),
    ("no target", b"GET\r\nHost: x\r\n\r\n", 400, "REQUEST_INVALID"),
    ("bad header name", b"GET /v2/ HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, "REQUEST_INVALID"),
    ("TLS on the plain port", TLS_HELLO, 400, "REQUEST_INVALID"),
    ("NUL bytes", b"\x00\x00\x00\x00 / HTTP/1.1\r\n\r\n", 400, "REQUEST_INVALID"),
]  # fmt: skip


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # the registry closes after a refusal
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("data", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_refused_requests_name_their_cause(
    client: Any, image: Image, data: bytes, status: int, code: str
) -> None:
    got, headers, body = await exchange(client.port, data)
    assert got == status, body
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["errors"][0]
    assert error["code"] == code and error["message"]
    if status == 405:
        assert headers["Allow"] == "GET, HEAD" and "FROB" in error["message"]
    response = await client.get("/v2/")  # the server is fine
    assert response.status == 200


def test_refusal_of_the_parser_exceptions() -> None:
    long_line = LineTooLong(b"x" * 100, 8190)
    assert refusal(long_line, Head(b"GET /", 9000)).status == 414
    assert refusal(long_line, Head(b"GET /", 20)).status == 431
    assert refusal(BadHttpMethod(error="Invalid method"), Head(b"PURGE / HTTP/1.1")).status == 405
    assert refusal(BadHttpMethod(error="x"), Head(TLS_HELLO)).code.name == "REQUEST_INVALID"
    assert refusal(BadStatusLine(error="x"), Head(b"GET / HTTP/7")).status == 400
    assert refusal(InvalidHeader(b"a b"), Head(b"GET / ", 14)).code.name == "REQUEST_INVALID"
