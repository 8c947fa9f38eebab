"""Pull authentication: the bearer token flow, Basic on /v2/, and what a 401 reveals."""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from niximage_registry import auth
from niximage_registry.app import AppSettings

pytestmark = pytest.mark.asyncio

USERS = {"alice": "s3cret", "bob": "hunter2"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


async def secured(make_client: Any, **options: Any) -> TestClient:
    settings = auth.AuthSettings(users=USERS, **options)
    return await make_client(AppSettings(auth=settings))  # type: ignore[no-any-return]


async def test_ping_challenges_with_realm_and_service(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    response = await client.get("/v2/")
    assert response.status == 401
    params = challenge_params(response.headers["WWW-Authenticate"])
    assert params["realm"] == f"http://127.0.0.1:{client.port}/token"
    assert params["service"] == "niximage"
    assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
    # Behind a TLS-terminating proxy the realm keeps the client's scheme.
    behind = await client.get("/v2/", headers={"X-Forwarded-Proto": "https"})
    realm = challenge_params(behind.headers["WWW-Authenticate"])["realm"]
    assert realm == f"https://127.0.0.1:{client.port}/token"
    odd = await client.get("/v2/", headers={"X-Forwarded-Proto": "gopher"})
    assert challenge_params(odd.headers["WWW-Authenticate"])["realm"].startswith("http://")


async def test_full_token_flow(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    denied = await client.get("/v2/test/app/manifests/latest")
    assert denied.status == 401
    params = challenge_params(denied.headers["WWW-Authenticate"])
    assert params["scope"] == "repository:test/app:pull"
    token_response = await client.get(
        "/token",
        params={"service": params["service"], "scope": params["scope"]},
        headers=basic("alice", "s3cret"),
    )
    assert token_response.status == 200
    document = await token_response.json()
    assert document["token"] == document["access_token"]
    assert document["expires_in"] >= 60 and document["issued_at"].endswith("Z")
    bearer = {"Authorization": f"Bearer {document['token']}"}
    manifest = await client.get("/v2/test/app/manifests/latest", headers=bearer)
    assert manifest.status == 200
    blob = await client.get(f"/v2/test/app/blobs/{image.layer_digest}", headers=bearer)
    assert await blob.read() == image.layer
    assert (await client.get("/v2/", headers=bearer)).status == 200


async def test_token_is_scoped_to_its_repositories(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    token = await (
        await client.get(
            "/token", params={"scope": "repository:test/app:pull"}, headers=basic("bob", "hunter2")
        )
    ).json()
    other = await client.get(
        "/v2/other/repo/manifests/latest", headers={"Authorization": f"Bearer {token['token']}"}
    )
    assert other.status == 401
    assert 'error="insufficient_scope"' in other.headers["WWW-Authenticate"]


async def test_push_scope_is_not_granted(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    response = await client.get(
        "/token",
        params=[("scope", "repository:test/app:push"), ("scope", "registry:catalog:*")],
        headers=basic("alice", "s3cret"),
    )
    claims = _claims((await response.json())["token"])
    assert claims["pull"] == []


async def test_several_scopes_in_one_request(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    response = await client.get(
        "/token",
        params=[("scope", "repository:test/app:pull,push"), ("scope", "repository:a/b:pull")],
        headers=basic("alice", "s3cret"),
    )
    assert _claims((await response.json())["token"])["pull"] == ["a/b", "test/app"]


async def test_containerd_password_grant(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    response = await client.post(
        "/token",
        data={
            "grant_type": "password",
            "username": "alice",
            "password": "s3cret",
            "client_id": "containerd-client",
            "scope": "repository:test/app:pull",
            "service": "niximage",
        },
    )
    assert response.status == 200
    token = (await response.json())["access_token"]
    ok = await client.head(
        "/v2/test/app/manifests/latest", headers={"Authorization": f"Bearer {token}"}
    )
    assert ok.status == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("alice", "wrong"),
        basic("mallory", "s3cret"),
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Bearer not.a.token"},
        {"Authorization": "Bearer "},
    ],
)
async def test_nothing_leaks_without_valid_credentials(
    make_client: Any, image: Any, headers: dict[str, str]
) -> None:
    client = await secured(make_client)
    paths = [
        "/v2/test/app/manifests/latest",
        "/v2/nope/manifests/latest",
        f"/v2/test/app/blobs/{image.layer_digest}",
        f"/v2/test/app/manifests/{image.manifest.digest}",
        "/v2/test/app/tags/list",
    ]
    for path in paths:
        for method in ("GET", "HEAD"):
            response = await client.request(method, path, headers=headers)
            body = await response.read()
            assert response.status == 401, path
            assert "WWW-Authenticate" in response.headers
            assert "Docker-Content-Digest" not in response.headers
            assert image.layer not in body and b"schemaVersion" not in body


async def test_token_endpoint_refuses_bad_credentials(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    assert (await client.get("/token", headers=basic("alice", "nope"))).status == 401
    assert (await client.get("/token")).status == 401  # anonymous not allowed
    form = {"grant_type": "password", "username": "alice", "password": "nope"}
    assert (await client.post("/token", data=form)).status == 401
    refresh = {"grant_type": "refresh_token", "refresh_token": "x"}
    assert (await client.post("/token", data=refresh)).status == 400


async def test_anonymous_pull(make_client: Any, image: Any) -> None:
    client = await secured(make_client, anonymous_pull=True)
    response = await client.get("/token", params={"scope": "repository:test/app:pull"})
    token = (await response.json())["token"]
    assert _claims(token)["sub"] == ""
    ok = await client.get(
        "/v2/test/app/manifests/latest", headers={"Authorization": f"Bearer {token}"}
    )
    assert ok.status == 200


async def test_basic_on_v2_directly(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    ok = await client.get("/v2/test/app/manifests/latest", headers=basic("alice", "s3cret"))
    assert ok.status == 200
    strict = await secured(make_client, allow_basic=False)
    refused = await strict.get("/v2/test/app/manifests/latest", headers=basic("alice", "s3cret"))
    assert refused.status == 401


async def test_forged_and_expired_tokens(make_client: Any, image: Any) -> None:
    authenticator = auth.Authenticator(auth.AuthSettings(users=USERS, secret=b"k" * 32))
    token = authenticator.issue("alice", ["test/app"])["token"]
    assert isinstance(token, str)
    assert authenticator.verify(token) is not None
    other = auth.Authenticator(auth.AuthSettings(users=USERS, secret=b"x" * 32))
    assert other.verify(token) is None
    _payload, _, signature = token.partition(".")
    claims = _claims(token)
    claims["pull"] = ["other/repo"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert authenticator.verify(f"{forged}.{signature}") is None
    claims = _claims(token)
    claims["exp"] = int(time.time()) - 1
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    expired = f"{body}.{base64.urlsafe_b64encode(authenticator._sign(body)).rstrip(b'=').decode()}"
    assert authenticator.verify(expired) is None


async def test_metrics_and_healthz_need_no_credentials(make_client: Any, image: Any) -> None:
    client = await secured(make_client)
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/metrics")).status == 200


def _claims(token: str) -> dict[str, Any]:
    payload = token.partition(".")[0]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]
