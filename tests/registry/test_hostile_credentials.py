"""Credentials and paths no client should send: each answer is a 4xx with the spec's JSON,
never a 500 (the issue's faults 1 and 10). Requests go out as raw bytes, so nothing in a
client library cleans them up first."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from niximage_registry import auth
from niximage_registry.app import AppSettings

pytestmark = pytest.mark.asyncio

SECRET = b"k" * 32


async def secured(make_client: Any) -> TestClient:
    settings = auth.AuthSettings(users={"alice": "s3cret"}, secret=SECRET)
    return await make_client(AppSettings(auth=settings))  # type: ignore[no-any-return]


async def raw(client: TestClient, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``request`` as it is; the status and the JSON body of the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


def get(path: str, *headers: bytes) -> bytes:
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: registry", b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def signed(claims: bytes) -> str:
    """A token signed with the registry's own key, whatever its claims say."""
    payload = base64.urlsafe_b64encode(claims).rstrip(b"=").decode()
    mac = hmac.new(SECRET, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


@pytest.mark.parametrize("path", ["/v2/", "/token?service=niximage"])
@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(b"Basic \xc3\xa9\xff\xfe", id="basic-non-ascii"),
        pytest.param(
            b"Basic " + base64.b64encode("alice:\udcff".encode(errors="surrogatepass")),
            id="basic-password-invalid-utf8",
        ),
        pytest.param(b"Bearer \xff\xfe.\xc3\x28", id="bearer-invalid-utf8"),
    ],
)
async def test_hostile_authorization_is_401(
    make_client: Any, image: Any, path: str, credentials: bytes
) -> None:
    client = await secured(make_client)
    status, body = await raw(client, get(path, b"Authorization: " + credentials))
    assert status in (400, 401), body
    assert body["errors"][0]["code"] in ("UNAUTHORIZED", "DENIED")


@pytest.mark.parametrize("exp", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
async def test_a_signed_token_with_a_non_finite_expiry_is_401(
    make_client: Any, image: Any, exp: bytes
) -> None:
    client = await secured(make_client)
    claims = b'{"sub":"alice","aud":"niximage","iat":0,"exp":' + exp + b',"pull":[]}'
    status, body = await raw(
        client, get("/v2/", f"Authorization: Bearer {signed(claims)}".encode())
    )
    assert status == 401 and body["errors"][0]["code"] == "UNAUTHORIZED", body


async def test_a_token_form_with_invalid_utf8_is_400(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    form = b"grant_type=password&username=alice&password=%ff%fe&scope=\xff"
    request = b"\r\n".join([
        b"POST /token HTTP/1.1", b"Host: registry", b"Connection: close",
        b"Content-Type: application/x-www-form-urlencoded",
        f"Content-Length: {len(form)}".encode(), b"", form,
    ])  # fmt: skip
    status, body = await raw(client, request)
    assert status in (400, 401), body
    assert body["errors"][0]["code"] in ("UNAUTHORIZED", "UNSUPPORTED", "NAME_INVALID")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/foo%0a/manifests/latest",
        "/v2/fo%0Ao/tags/list",
        "/v2/%0a/blobs/sha256:" + "a" * 64,
        "/v2/foo%0d%0abar/manifests/latest",
    ],
)
async def test_a_newline_in_a_name_is_name_invalid(make_client: Any, image: Any, path: str) -> None:
    client = await make_client()
    status, body = await raw(client, get(path))
    assert (status, body["errors"][0]["code"]) == (400, "NAME_INVALID"), body


async def test_a_newline_in_a_tag_is_tag_invalid(make_client: Any, image: Any) -> None:
    client = await make_client()
    status, body = await raw(client, get("/v2/shell/jq/manifests/lat%0aest"))
    assert (status, body["errors"][0]["code"]) == (400, "TAG_INVALID"), body


async def test_a_malformed_request_logs_one_line_without_a_traceback(
    make_client: Any, image: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    with caplog.at_level("DEBUG", logger="aiohttp.server"):
        malformed = [
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        ]
        for request, expected in malformed:
            status, body = await raw(client, request)
            assert status == expected and body["errors"][0]["code"]
    # One line per refusal class and interval (limits.RefusalLog): both are "malformed".
    records = [
        r for r in caplog.records if r.name in ("aiohttp.server", "niximage.registry.connections")
    ]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert all(r.exc_info is None and r.levelname == "WARNING" for r in records)
    assert all("HTTP parser could not accept" in r.getMessage() for r in records)


async def test_failed_logins_are_throttled_per_client(make_client: Any, image: Any) -> None:
    """Fault 9: guessing is 429 after ten failures in a minute, on /token and on Basic."""
    client = await secured(make_client)
    wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:guess").decode()}
    statuses = [(await client.get("/token", headers=wrong)).status for _ in range(30)]
    assert statuses == [401] * 10 + [429] * 20
    right = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    response = await client.get("/v2/", headers=right)
    assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_the_window_slides_and_memory_is_bounded() -> None:
    now = [0.0]
    logins = auth.FailedLogins(limit=3, window=60.0, clock=lambda: now[0], max_clients=2)
    for _ in range(3):
        assert logins.retry_after("a") is None
        logins.failed("a")
    assert logins.retry_after("a") == 60.0
    now[0] = 30.0
    assert logins.retry_after("a") == 30.0
    now[0] = 60.5
    assert logins.retry_after("a") is None  # the failures left the window
    for client in ("b", "c", "d"):
        logins.failed(client)
    assert len(logins._failures) == 2
