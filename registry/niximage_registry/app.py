"""``make_app``: the aiohttp application of the registry. The only place routes are wired.

One middleware renders every ``RegistryError`` (and aiohttp's own HTTP errors, and bugs)
as the spec's JSON envelope, and records the request's metrics. Every path has a route
(a catch-all answers unknown ones), and every route accepts every method, so no request
ends in aiohttp's plain-text 404/405.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from niximage_core.storage.base import Storage
from niximage_registry import auth, errors, paths
from niximage_registry.blobs import Blobs
from niximage_registry.content import CacheSettings, Content
from niximage_registry.errors import Code, RegistryError
from niximage_registry.metrics import Metrics
from niximage_registry.ondemand import OnDemand, OnDemandSettings
from niximage_registry.routes import ROUTE, Registry

log = logging.getLogger(__name__)

REGISTRY = web.AppKey("registry", Registry)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUS_CODES = {
    400: Code.NAME_INVALID,
    401: Code.UNAUTHORIZED,
    403: Code.DENIED,
    404: Code.NAME_UNKNOWN,
    405: Code.UNSUPPORTED,
    413: Code.UNSUPPORTED,
    429: Code.TOOMANYREQUESTS,
}


@dataclass(frozen=True)
class AppSettings:
    cache: CacheSettings = field(default_factory=CacheSettings)
    signed_url_ttl: int = 300
    """Seconds a signed blob URL stays valid (GCS)."""
    redirect_blobs: bool = True
    """Answer GCS blob GETs with 307 to a signed URL when the credentials can sign."""
    storage_threads: int = 16
    auth: auth.AuthSettings | None = None
    ondemand: OnDemandSettings | None = None
    worker: str = "0"


def make_app(storage: Storage, settings: AppSettings | None = None) -> web.Application:
    """The registry over ``storage``."""
    settings = settings or AppSettings()
    metrics = Metrics(settings.worker)
    executor = ThreadPoolExecutor(settings.storage_threads, thread_name_prefix="niximage-storage")
    content = Content(storage, executor, settings.cache, metrics.cache_lookup)
    blobs = Blobs(
        content,
        settings.signed_url_ttl,
        settings.redirect_blobs,
        on_sent=lambda count: metrics.sent("blob", count),
        on_redirect=lambda: metrics.redirects.labels(metrics.worker).inc(),
    )
    ondemand = None
    if settings.ondemand is not None:
        ondemand = OnDemand(storage, content, settings.ondemand, metrics)
    authenticator = auth.Authenticator(settings.auth) if settings.auth else None
    registry = Registry(content, blobs, metrics, authenticator, ondemand)

    app = web.Application(middlewares=[_middleware(metrics)], client_max_size=64 * 1024)
    app[REGISTRY] = registry
    app.router.add_route("*", "/v2", registry.v2)
    # [\s\S], not ".": a percent-decoded newline in a name must reach the name check (400
    # NAME_INVALID), not miss the route (404).
    app.router.add_route("*", r"/v2/{path:[\s\S]*}", registry.v2)
    if authenticator is not None:
        app.router.add_route("*", "/token", registry.token)
    app.router.add_route("*", "/healthz", _read_only(registry.healthz))
    app.router.add_route("*", "/readyz", _read_only(registry.readyz))
    app.router.add_route("*", "/metrics", _read_only(registry.metrics_page))
    app.router.add_route("*", r"/{path:[\s\S]*}", _no_route)

    async def lifetime(_app: web.Application) -> AsyncIterator[None]:
        yield
        if ondemand is not None:
            await ondemand.close()
        executor.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(lifetime)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _read_only(handler: Handler) -> Handler:
    async def only_get(request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise errors.unsupported("GET, HEAD")
        return await handler(request)

    return only_get


async def _no_route(request: web.Request) -> web.StreamResponse:
    raise paths.no_route()


def _middleware(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def render_and_measure(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except RegistryError as error:
            response = errors.response(error)
        except web.HTTPException as exc:  # aiohttp's own (body too large, bad request)
            code = _STATUS_CODES.get(exc.status, Code.UNSUPPORTED)
            error = RegistryError(code, exc.reason, status=exc.status)
            response = errors.response(error)
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path[:200])
            response = errors.response(RegistryError(Code.UNKNOWN))
        method = request.method if request.method in _METHODS else "OTHER"
        route = request.get(ROUTE, "other")
        metrics.observe(route, method, response.status, time.perf_counter() - started)
        return response

    return render_and_measure
