"""Kubernetes pull authorisation in the registry's routes, with an in-memory stand-in for
the API server's reviews (tests/cluster/test_pull_auth.py runs the real TokenReview and
SubjectAccessReview on a real kube-apiserver)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from niximage_registry import auth, kubeauth
from niximage_registry.app import AppSettings
from niximage_registry.kubeauth import KubeUser, ReviewUnavailable


def jwt(name: str) -> str:
    """A token-shaped string (the registry never parses it: the API server does)."""
    part = base64.urlsafe_b64encode(json.dumps({"sub": name}).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2lnbmF0dXJlLW9mLXRoZS1hcGktc2VydmVy"


TEST_TOKEN = jwt("system:serviceaccount:test:puller")
OTHER_TOKEN = jwt("system:serviceaccount:other:puller")


class Reviews:
    """What the API server would answer: two service accounts, each may read NixImages of
    its own namespace only."""

    def __init__(self) -> None:
        self.users = {
            TEST_TOKEN: KubeUser("system:serviceaccount:test:puller", "u1", ("a",)),
            OTHER_TOKEN: KubeUser("system:serviceaccount:other:puller", "u2"),
        }
        self.down = False
        self.calls: list[str] = []

    def user(self, token: str) -> KubeUser | None:
        self.calls.append("TokenReview")
        if self.down:
            raise ReviewUnavailable("the API server is unreachable")
        return self.users.get(token)

    def may_pull(self, user: KubeUser, namespace: str) -> bool:
        self.calls.append(f"SubjectAccessReview {namespace}")
        return user.username.split(":")[2] == namespace

    def allowed_namespaces(self, user: KubeUser, namespaces: list[str]) -> set[str]:
        return {namespace for namespace in namespaces if self.may_pull(user, namespace)}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def kube_client(make_client: Any, reviews: Reviews, **options: Any) -> TestClient:
    settings = auth.AuthSettings(users={}, reviews=reviews, **options)  # type: ignore[arg-type]
    return await make_client(AppSettings(auth=settings))  # type: ignore[no-any-return]


async def token_for(client: TestClient, password: str, *scopes: str) -> dict[str, Any]:
    query = [("service", "niximage"), *(("scope", s) for s in scopes)]
    response = await client.get("/token", params=query, headers=basic("any", password))
    assert response.status == 200, await response.text()
    return await response.json()  # type: ignore[no-any-return]


@pytest.mark.asyncio
async def test_a_service_account_token_pulls_its_namespace_only(
    make_client: Any, image: Any
) -> None:
    client = await kube_client(make_client, Reviews())
    issued = await token_for(
        client, TEST_TOKEN, "repository:test/app:pull", "repository:other/repo:pull"
    )
    bearer = {"Authorization": f"Bearer {issued['token']}"}
    own = await client.get("/v2/test/app/manifests/latest", headers=bearer)
    assert own.status == 200
    foreign = await client.get("/v2/other/repo/manifests/latest", headers=bearer)
    assert foreign.status == 401
    assert 'error="insufficient_scope"' in foreign.headers["WWW-Authenticate"]
    assert (await foreign.json())["errors"][0]["code"] == "UNAUTHORIZED"


@pytest.mark.asyncio
async def test_containerd_password_grant_with_a_token(make_client: Any, image: Any) -> None:
    client = await kube_client(make_client, Reviews())
    form = {
        "grant_type": "password",
        "username": "serviceaccount",
        "password": OTHER_TOKEN,
        "service": "niximage",
        "scope": "repository:other/repo:pull",
    }
    response = await client.post("/token", data=form)
    assert response.status == 200
    token = (await response.json())["access_token"]
    pulled = await client.get(
        "/v2/other/repo/manifests/latest", headers={"Authorization": f"Bearer {token}"}
    )
    assert pulled.status == 200


@pytest.mark.asyncio
async def test_basic_and_raw_bearer_tokens_on_v2(make_client: Any, image: Any) -> None:
    reviews = Reviews()
    client = await kube_client(make_client, reviews)
    assert (
        await client.get("/v2/test/app/tags/list", headers=basic("x", TEST_TOKEN))
    ).status == 200
    raw = {"Authorization": f"Bearer {TEST_TOKEN}"}
    assert (await client.get("/v2/test/app/manifests/latest", headers=raw)).status == 200
    denied = await client.get("/v2/other/repo/manifests/latest", headers=basic("x", TEST_TOKEN))
    assert denied.status == 403
    assert (await denied.json())["errors"][0]["code"] == "DENIED"
    # A name that no NixImage can have (no namespace) is denied to every Kubernetes identity.
    assert (await client.get("/v2/a/tags/list", headers=raw)).status == 403


@pytest.mark.asyncio
async def test_unknown_tokens_are_refused_and_throttled(make_client: Any, image: Any) -> None:
    client = await kube_client(make_client, Reviews(), failed_login_limit=3)
    stranger = jwt("system:serviceaccount:evil:x")
    for _ in range(3):
        response = await client.get("/v2/test/app/tags/list", headers=basic("x", stranger))
        assert response.status == 401
    throttled = await client.get("/v2/test/app/tags/list", headers=basic("x", stranger))
    assert throttled.status == 429 and "Retry-After" in throttled.headers


@pytest.mark.asyncio
async def test_what_is_not_a_token_never_reaches_the_api_server(
    make_client: Any, image: Any
) -> None:
    reviews = Reviews()
    client = await kube_client(make_client, reviews)
    for password in ("hunter2", "a.b", "x" * 5000, "é.é.é"):
        response = await client.get("/token", headers=basic("x", password))
        assert response.status == 401
    assert reviews.calls == []


@pytest.mark.asyncio
async def test_an_api_server_outage_is_a_503_not_a_refusal(make_client: Any, image: Any) -> None:
    reviews = Reviews()
    reviews.down = True
    client = await kube_client(make_client, reviews)
    response = await client.get("/v2/test/app/tags/list", headers=basic("x", TEST_TOKEN))
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"


@pytest.mark.asyncio
async def test_static_users_keep_working_beside_kubernetes(make_client: Any, image: Any) -> None:
    settings = auth.AuthSettings(users={"alice": "s3cret"}, reviews=Reviews())  # type: ignore[arg-type]
    client = await make_client(AppSettings(auth=settings))
    assert (
        await client.get("/v2/other/repo/tags/list", headers=basic("alice", "s3cret"))
    ).status == 200


def test_token_shape_and_namespaces() -> None:
    assert kubeauth.looks_like_token(TEST_TOKEN)
    assert not kubeauth.looks_like_token("hunter2")
    assert not kubeauth.looks_like_token("a.b.c")  # too short to be a JWT
    assert not kubeauth.looks_like_token("x" * 20 + ".y=y.z")
    assert kubeauth.namespace_of("team-a/app") == "team-a"
    assert kubeauth.namespace_of("app") is None
    assert kubeauth.namespace_of("team/app/extra") is None
    assert kubeauth.namespace_of("Team/app") is None
    assert kubeauth.namespace_of("-x/app") is None


def test_authentication_needs_someone_to_let_in() -> None:
    with pytest.raises(Exception, match="needs users"):
        auth.Authenticator(auth.AuthSettings(users={}))


class ApiServer:
    """The two review endpoints as the registry calls them; records what it is asked."""

    def __init__(self) -> None:
        self.token_reviews = 0
        self.asked: list[tuple[str, str, str, str]] = []

    def post(self, review: tuple[str, str, str], spec: dict[str, Any]) -> dict[str, Any]:
        if review == kubeauth.TOKEN_REVIEW:
            self.token_reviews += 1
            if spec["token"] != TEST_TOKEN:
                return {"authenticated": False}
            user = {"username": "system:serviceaccount:test:puller", "uid": "u1"}
            return {"authenticated": True, "user": user}
        assert review == kubeauth.ACCESS_REVIEW
        attributes = spec["resourceAttributes"]
        self.asked.append(
            (spec["user"], attributes["namespace"], attributes["verb"], attributes["resource"])
        )
        return {"allowed": attributes["namespace"] == "test"}


def test_reviews_ask_once_per_token_and_namespace_within_the_ttl() -> None:
    now = [0.0]
    server = ApiServer()
    reviews = kubeauth.Reviews(server.post, ttl=10, clock=lambda: now[0])
    for _ in range(3):
        user = reviews.user(TEST_TOKEN)
        assert user is not None and user.username == "system:serviceaccount:test:puller"
        assert reviews.user(OTHER_TOKEN) is None
        assert reviews.allowed_namespaces(user, ["test", "other", "test"]) == {"test"}
    assert server.token_reviews == 2  # one per token, the refusal cached too
    assert sorted(server.asked) == [
        ("system:serviceaccount:test:puller", "other", "get", "niximages"),
        ("system:serviceaccount:test:puller", "test", "get", "niximages"),
    ]
    now[0] = 11.0  # past the ttl: asked again
    reviews.user(TEST_TOKEN)
    assert server.token_reviews == 3
