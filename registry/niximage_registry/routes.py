"""The registry's HTTP handlers: ``/v2/…``, the token endpoint, health and metrics.

Handlers raise ``RegistryError``; the middleware in ``app`` renders it. Order of checks on
``/v2/``: the path's grammar (400, purely syntactic) → authentication (401, before any
storage read, so a 401 reveals nothing) → method (405 for push and delete) → storage.

Repository scope of blobs and manifests by digest, as distribution's repository links:
a digest is served under ``<name>`` only when ``<name>``'s tags, or its revision links (every
manifest it was ever tagged with, ``niximage_core.revisions``), reach it: a manifest, an
index's manifests, their configs and layers. A pull by digest of an image whose tag has
moved on still works under its own repository; whoever may pull one repository cannot
fetch another's blobs even knowing their digests. Unknown repositories answer 404
``NAME_UNKNOWN`` to everything, so a name never probes content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote

from aiohttp import web

from niximage_core import manifest
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_registry import auth, kubeauth, paths
from niximage_registry.blobs import Blobs
from niximage_registry.blobs import unknown as unknown_blob
from niximage_registry.content import Content, Manifest
from niximage_registry.errors import Code, RegistryError, unsupported
from niximage_registry.metrics import Metrics
from niximage_registry.ondemand import OnDemand

READ = ("GET", "HEAD")
ROUTE = web.RequestKey("route", str)
"""Which route answered (a metrics label and an access-log field)."""
USER = web.RequestKey("user", str)
"""The authenticated user ("" for anonymous tokens)."""
API_VERSION = {"Docker-Distribution-Api-Version": "registry/2.0"}
MAX_PAGE = 10_000
T = TypeVar("T")
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(f"{_TOKEN}/{_TOKEN}")
"""RFC 6838's type/subtype grammar, as the spec asks of an ``artifactType``."""
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


class Registry:
    """Handlers over one storage; optional authentication and on-demand builds."""

    def __init__(
        self,
        content: Content,
        blobs: Blobs,
        metrics: Metrics,
        authenticator: auth.Authenticator | None = None,
        ondemand: OnDemand | None = None,
    ) -> None:
        self.content = content
        self.blobs = blobs
        self.metrics = metrics
        self.auth = authenticator
        self.ondemand = ondemand

    # /v2/…

    async def v2(self, request: web.Request) -> web.StreamResponse:
        target = paths.parse(request.path)
        request[ROUTE] = target.kind.value
        if self.auth is not None:
            request[USER] = await self._authenticate(request, target)
        kind = target.kind
        if kind is paths.Kind.UPLOAD:
            raise unsupported("")
        if request.method not in READ:
            raise unsupported("GET" if kind is paths.Kind.TAGS else "GET, HEAD")
        if kind is paths.Kind.BASE:
            return web.json_response({}, headers=API_VERSION)
        if kind is paths.Kind.MANIFEST:
            return await self.manifest(request, target)
        if kind is paths.Kind.BLOB:
            return await self.blob(request, target)
        if kind is paths.Kind.TAGS:
            return await self.tags(request, target)
        return await self.referrers(request, target)

    async def manifest(self, request: web.Request, target: paths.Target) -> web.StreamResponse:
        name = target.name
        if target.tag is not None:
            digest = await self.content.tag(name, target.tag)
            if digest is None and (subject := _fallback_subject(target.tag)) is not None:
                listed = await self.content.referrers(name, subject)
                if listed:
                    index = manifest.referrers_index(listed)
                    found = Manifest(index.digest, index.data, index.media_type)
                    return self._manifest_response(request, found)
            if digest is None:
                if self.ondemand is not None and self.ondemand.accepts(target.tag):
                    digest = await self.ondemand.ensure(name, target.tag)
                else:
                    raise await self._unknown_manifest(name, target.reference)
        else:
            digest = target.digest
            assert digest is not None
            if not await self.content.repository_exists(name):
                raise unknown_name(name)
            if not await self.content.serves(name, digest):
                raise await self._unknown_manifest(name, target.reference)
        found = await self.content.manifest(digest)
        if found is None:
            raise await self._unknown_manifest(name, target.reference)
        return self._manifest_response(request, found)

    def _manifest_response(self, request: web.Request, found: Manifest) -> web.Response:
        etag = f'"{found.digest}"'
        headers = {
            "Content-Type": found.media_type,
            "Docker-Content-Digest": str(found.digest),
            "ETag": etag,
        }
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        if request.method == "GET":
            self.metrics.sent("manifest", len(found.data))
        # Never converted, whatever Accept says: the stored bytes and their own type. For
        # HEAD aiohttp sends the body's true Content-Length, and no body.
        return web.Response(body=found.data, headers=headers)

    async def _unknown_manifest(self, name: str, ref: str) -> RegistryError:
        if not await self.content.repository_exists(name):
            return unknown_name(name)
        return RegistryError(
            Code.MANIFEST_UNKNOWN,
            f"manifest {name}:{ref} is unknown",
            {"name": name, "reference": ref},
        )

    async def blob(self, request: web.Request, target: paths.Target) -> web.StreamResponse:
        assert target.digest is not None
        if not await self.content.repository_exists(target.name):
            raise unknown_name(target.name)
        if not await self.content.serves(target.name, target.digest):
            raise unknown_blob(target.digest)
        if request.method == "HEAD":
            return await self.blobs.head(target.digest)
        return await self.blobs.get(request, target.digest)

    async def tags(self, request: web.Request, target: paths.Target) -> web.Response:
        """Sorted tags with ``n``/``last`` paging and a ``Link`` to the next page."""
        tags = sorted(await self.content.tags(target.name))
        if not tags:
            raise unknown_name(target.name)
        last = request.query.get("last")
        if last:
            tags = [t for t in tags if t > last]
        headers: dict[str, str] = {}
        size = request.query.get("n")
        if size is not None:
            limit = page_size(size)
            if len(tags) > limit:
                tags = tags[:limit]
                if tags:
                    query = f"n={limit}&last={quote(tags[-1], safe='')}"
                    headers["Link"] = f'</v2/{target.name}/tags/list?{query}>; rel="next"'
        body = json.dumps({"name": target.name, "tags": tags}).encode()
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def referrers(self, request: web.Request, target: paths.Target) -> web.Response:
        """OCI 1.1 referrers: an image index of the artifacts about a manifest (its SBOM),
        filtered by ``artifactType`` when asked; empty, never 404, when there are none."""
        wanted = request.query.get("artifactType")
        if wanted is not None and not _MEDIA_TYPE.fullmatch(wanted):
            raise RegistryError(
                Code.REQUEST_INVALID,
                f"invalid artifactType {wanted[:100]!r}: expected a media type",
                {"artifactType": wanted[:300]},
            )
        listed = []
        if target.digest is not None:
            listed = await self.content.referrers(target.name, target.digest)
        headers = {}
        if wanted is not None:
            listed = [d for d in listed if d.get("artifactType") == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        index = manifest.referrers_index(listed)
        if request.method == "GET":
            self.metrics.sent("referrers", len(index.data))
        return web.Response(body=index.data, content_type=manifest.OCI_INDEX, headers=headers)

    # authentication

    async def _authenticate(self, request: web.Request, target: paths.Target) -> str:
        """The caller's name ("" for anonymous), or raise 401 with the challenge (403 for
        a Kubernetes identity that may not read the repository's namespace)."""
        assert self.auth is not None
        repository = target.name or None
        header = request.headers.get("Authorization", "")
        error = None
        if header[:7].lower() == "bearer ":
            token = header[7:].strip()
            grant = self.auth.verify(token)
            if grant is not None and self.auth.allows(grant, repository):
                return grant.subject
            error = "invalid_token" if grant is None else "insufficient_scope"
            if grant is None and self.auth.settings.reviews is not None:
                # A service account token sent as it is (curl, scripts).
                identity = await self._kube_login(request, token)
                if identity is not None:
                    return await self._authorise(identity, repository)
        elif header and self.auth.settings.allow_basic:
            self._throttle(request)
            identity = await self._login(request, auth.basic_credentials(header))
            if identity is not None:
                return await self._authorise(identity, repository)
            self.auth.failed_logins.failed(_client(request))
        realm = self.auth.settings.realm or f"{_scheme(request)}://{_safe_host(request)}/token"
        raise RegistryError(
            Code.UNAUTHORIZED,
            "authentication required",
            {"scope": f"repository:{repository}:pull"} if repository else None,
            headers={"WWW-Authenticate": self.auth.challenge(realm, repository, error)},
        )

    async def _authorise(self, identity: auth.Identity, repository: str | None) -> str:
        """``identity``'s name if it may pull ``repository``, else 403 DENIED."""
        if repository is None or await self._pullable(identity, [repository]):
            return identity.subject
        raise RegistryError(
            Code.DENIED,
            f"{identity.subject} may not pull {repository}",
            {"name": repository},
        )

    async def _login(
        self, request: web.Request, credentials: tuple[str, str] | None
    ) -> auth.Identity | None:
        """A static user with its password, or a Kubernetes token as the password."""
        assert self.auth is not None
        if credentials is None:
            return None
        user, password = credentials
        if self.auth.check_password(user, password):
            return auth.Identity(user)
        return await self._kube_login(request, password)

    async def _kube_login(self, request: web.Request, token: str) -> auth.Identity | None:
        reviews = self.auth.settings.reviews if self.auth else None
        if reviews is None or not kubeauth.looks_like_token(token):
            return None
        user = await self._review(reviews.user, token)
        return None if user is None else auth.Identity(user.username, user)

    async def _pullable(self, identity: auth.Identity, repositories: list[str]) -> list[str]:
        """The repositories ``identity`` may pull: all for static users; for Kubernetes
        identities those whose namespace lets it ``get`` NixImages."""
        reviews = self.auth.settings.reviews if self.auth else None
        if identity.kube is None:
            return repositories
        if reviews is None:
            return []
        by_namespace = {repo: kubeauth.namespace_of(repo) for repo in repositories}
        wanted = sorted({ns for ns in by_namespace.values() if ns is not None})
        allowed = await self._review(reviews.allowed_namespaces, identity.kube, wanted)
        return [repo for repo, ns in by_namespace.items() if ns in allowed]

    async def _review(self, function: Callable[..., T], *args: object) -> T:
        """A blocking Kubernetes review, off the loop; an API server outage is a 503."""
        try:
            return await self.content.run(function, *args)
        except kubeauth.ReviewUnavailable:
            raise RegistryError(
                Code.UNAVAILABLE,
                "authorisation is unavailable; retry later",
                headers={"Retry-After": "5"},
            ) from None

    async def token(self, request: web.Request) -> web.Response:
        """The token endpoint: GET with Basic credentials, or containerd's POST grant."""
        request[ROUTE] = "token"
        assert self.auth is not None
        self._throttle(request)
        identity: auth.Identity | None
        if request.method == "GET":
            scopes = request.query.getall("scope", [])
            header = request.headers.get("Authorization")
            identity = await self._login(request, auth.basic_credentials(header))
            if header and identity is None:
                raise self._bad_credentials(request)
        elif request.method == "POST":
            try:
                form = await request.post()
            except ValueError:  # a form that is not UTF-8 (UnicodeDecodeError) or malformed
                raise self._bad_credentials(request) from None
            if form.get("grant_type") != "password":
                raise RegistryError(Code.UNSUPPORTED, "only the password grant", status=400)
            credentials = (str(form.get("username", "")), str(form.get("password", "")))
            identity = await self._login(request, credentials)
            if identity is None:
                raise self._bad_credentials(request)
            scopes = [str(s) for s in form.getall("scope", [])]
        else:
            raise unsupported("GET, POST")
        if identity is None and not self.auth.settings.anonymous_pull:
            raise self._bad_credentials(request)
        subject = identity.subject if identity else None
        granted = self.auth.grant(subject, scopes)
        if identity is not None:
            # The token spec: grant the intersection of what was asked and what is allowed.
            granted = await self._pullable(identity, granted)
        return web.json_response(self.auth.issue(subject or "", granted))

    def _throttle(self, request: web.Request) -> None:
        """429 for a client that failed to log in too often of late."""
        assert self.auth is not None
        wait = self.auth.failed_logins.retry_after(_client(request))
        if wait is not None:
            raise RegistryError(
                Code.TOOMANYREQUESTS,
                "too many failed logins; retry later",
                headers={"Retry-After": str(int(wait + 0.999))},
            )

    def _bad_credentials(self, request: web.Request) -> RegistryError:
        """401 for credentials that do not hold; the failure counts against the client."""
        if self.auth is not None:
            self.auth.failed_logins.failed(_client(request))
        service = self.auth.settings.service if self.auth else ""
        return RegistryError(
            Code.UNAUTHORIZED,
            "invalid or missing credentials",
            headers={"WWW-Authenticate": f'Basic realm="{service}"'},
        )

    # operations

    async def healthz(self, request: web.Request) -> web.Response:
        request[ROUTE] = "healthz"
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready while storage answers: a replica that cannot read storage leaves the
        Service's endpoints, and pulls go to the others."""
        request[ROUTE] = "readyz"
        if await self.content.storage_answers():
            return web.json_response({"status": "ok"})
        return web.json_response(
            {"status": "storage unavailable"}, status=503, headers={"Retry-After": "5"}
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        request[ROUTE] = "metrics"
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )


def _scheme(request: web.Request) -> str:
    """The scheme the client used: a TLS-terminating proxy (an Ingress, a load balancer) says
    it in X-Forwarded-Proto. Trusting it is harmless: the realm only goes back to the same
    client, which can at most mislead itself."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return forwarded if forwarded in ("http", "https") else request.scheme


def _safe_host(request: web.Request) -> str:
    """The Host header for the default realm, if it cannot break out of the quotes."""
    host = request.host
    return host if _HOST.fullmatch(host) else "localhost"


def page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_PAGE or len(text) > 6:
        raise RegistryError(
            Code.PAGINATION_NUMBER_INVALID, f"n must be an integer from 0 to {MAX_PAGE}"
        )
    return value


def _fallback_subject(tag: str) -> Digest | None:
    """The manifest a referrers tag (``sha256-<hex>``, the spec's fallback for clients
    without the referrers API) is about, or None for any other tag."""
    algorithm, _, hex_ = tag.partition("-")
    if algorithm != "sha256":
        return None
    try:
        return Digest(hex_)
    except InvalidInput:
        return None


def unknown_name(name: str) -> RegistryError:
    return RegistryError(Code.NAME_UNKNOWN, f"repository {name} is unknown", {"name": name})


def _client(request: web.Request) -> str:
    """Who to count failed logins against: the peer address (behind a proxy, the proxy's;
    a trusted proxy header is not taken on faith)."""
    return request.remote or "?"
