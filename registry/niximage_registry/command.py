"""``niximage serve``: arguments, settings, and the server's lifetime.

``add_arguments`` and ``run`` are what the ``niximage`` command line wires; it also hands
``run`` what on-demand builds need (``OnDemandBuilds``: a pinned source and a build
function), so this package never imports the build pipeline. The server listens on ``--listen``,
logs one JSON line ``{"event": "listening", "address": …}`` on stderr when it is ready
(with the real port when ``:0`` was asked), and on SIGTERM/SIGINT stops accepting, lets
in-flight responses finish for ``--shutdown-timeout`` seconds, kills on-demand builds, and
exits 0. ``--workers N`` forks N processes sharing the port (``SO_REUSEPORT``); the kernel
spreads connections over them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from niximage_core.errors import InvalidInput, NixImageError
from niximage_core.sources import PackageSource
from niximage_core.storage import factory
from niximage_registry import auth
from niximage_registry.ondemand import BuildFunction

if TYPE_CHECKING:
    from aiohttp import web

    from niximage_registry.app import AppSettings
    from niximage_registry.limits import ConnectionLimits


@dataclass(frozen=True)
class OnDemandBuilds:
    """What ``--on-demand`` needs from a builder: the source every image is built from
    (pinned once, at start) and the function that builds one."""

    source: PackageSource
    build: BuildFunction


OnDemandFactory = Callable[[argparse.Namespace], OnDemandBuilds]
"""Makes ``OnDemandBuilds`` from the parsed flags (``--package-source``, ``--build-timeout``)."""

# aiohttp and the app are imported when serving, not when the CLI builds its parser: the
# other subcommands (``niximage build``) should not pay for them at every start.

log = logging.getLogger("niximage.registry")

DEFAULT_LISTEN = "127.0.0.1:5000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--storage", default=env("NIXIMAGE_STORAGE", ".niximage"), help="DIR or gs://BUCKET"
    )
    parser.add_argument(
        "--listen",
        default=env("NIXIMAGE_LISTEN", DEFAULT_LISTEN),
        help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds to finish responses"
    )
    parser.add_argument("--no-access-log", action="store_true", help="no JSON access log")
    parser.add_argument(
        "--storage-deadline",
        type=float,
        default=5.0,
        help="seconds a GCS read keeps retrying before the pull gets 503 (default 5)",
    )
    parser.add_argument(
        "--tag-cache-ttl", type=float, default=1.0, help="seconds a tag lookup is reused"
    )
    group = parser.add_argument_group("on-demand builds")
    group.add_argument(
        "--on-demand", action="store_true", help="build Nixery-style names on first pull"
    )
    group.add_argument("--package-source", help="package source for on-demand builds")
    group.add_argument("--max-builds", type=int, default=2, help="builds running at once")
    group.add_argument("--max-queued", type=int, default=16, help="builds waiting at most")
    group.add_argument(
        "--build-timeout", type=float, default=3600.0, help="Nix wall-clock limit, s"
    )
    group.add_argument(
        "--build-wait", type=float, default=600.0, help="seconds a pull waits for a build"
    )
    group = parser.add_argument_group("GCS blobs")
    group.add_argument("--signed-url-ttl", type=int, default=300, help="seconds (GET only)")
    group.add_argument(
        "--no-redirect", action="store_true", help="stream GCS blobs, never redirect"
    )
    group = parser.add_argument_group("connections (docs/architecture.md#the-registry)")
    group.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection may take to send complete request headers (default 10)",
    )
    group.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="seconds an idle keep-alive connection is kept (default 60)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="connections at once (default: from the open-files limit, 2 per connection)",
    )
    group.add_argument(
        "--max-connections-per-client",
        type=int,
        default=256,
        help="connections at once from one address (default 256; 0: --max-connections)",
    )
    group.add_argument(
        "--max-header-bytes",
        type=int,
        default=32 * 1024,
        help="request line and headers, bytes (default 32768; larger: 431)",
    )
    group = parser.add_argument_group("authentication (off without --auth-users or -kubernetes)")
    group.add_argument("--auth-users", help="user:password file, or a directory (Secret)")
    group.add_argument("--auth-secret-file", help="HMAC key for tokens (share it across replicas)")
    group.add_argument("--auth-anonymous-pull", action="store_true", help="tokens without login")
    group.add_argument("--auth-realm", help="token endpoint URL (default: <request host>/token)")
    group.add_argument("--auth-service", default="niximage", help="service name in tokens")
    group.add_argument("--auth-token-ttl", type=int, default=300, help="token lifetime, s")
    group.add_argument("--auth-no-basic", action="store_true", help="refuse Basic on /v2/")
    group.add_argument(
        "--auth-kubernetes",
        action="store_true",
        help="accept Kubernetes service account tokens as pull passwords (TokenReview, "
        "then SubjectAccessReview: get niximages in the image's namespace)",
    )
    group.add_argument(
        "--auth-review-ttl", type=float, default=10.0, help="seconds a review answer is reused"
    )


def settings_from_args(
    args: argparse.Namespace, on_demand: OnDemandFactory | None = None
) -> AppSettings:
    """Everything that can be checked before listening: bad flags fail fast, with exit 2."""
    from niximage_registry.app import AppSettings
    from niximage_registry.content import CacheSettings
    from niximage_registry.ondemand import OnDemandSettings

    if args.workers < 1:
        raise InvalidInput("--workers must be at least 1")
    if args.on_demand and args.workers > 1:
        raise InvalidInput("--on-demand builds need a single worker (--workers 1)")
    ondemand = None
    if args.on_demand:
        if on_demand is None:
            raise InvalidInput("--on-demand needs a builder: run it as `niximage serve`")
        builds = on_demand(args)
        ondemand = OnDemandSettings(
            source=builds.source,
            build=builds.build,
            max_builds=args.max_builds,
            max_queued=args.max_queued,
            wait=args.build_wait,
        )
    auth_settings = None
    if args.auth_users or args.auth_kubernetes:
        reviews = None
        if args.auth_kubernetes:
            from niximage_registry.kubeauth import Reviews

            reviews = Reviews.load(args.auth_review_ttl)
        auth_settings = auth.AuthSettings(
            users=auth.load_users(args.auth_users) if args.auth_users else {},
            reviews=reviews,
            service=args.auth_service,
            realm=args.auth_realm,
            anonymous_pull=args.auth_anonymous_pull,
            token_ttl=args.auth_token_ttl,
            allow_basic=not args.auth_no_basic,
            **(
                {"secret": auth.load_secret(args.auth_secret_file)} if args.auth_secret_file else {}
            ),
        )
    return AppSettings(
        cache=CacheSettings(tag_ttl=args.tag_cache_ttl),
        signed_url_ttl=args.signed_url_ttl,
        redirect_blobs=not args.no_redirect,
        auth=auth_settings,
        ondemand=ondemand,
    )


def connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    """The ``connections`` flags, checked (``limits`` has what they do)."""
    from niximage_registry.limits import ConnectionLimits

    if args.header_timeout <= 0 or args.idle_timeout <= 0:
        raise InvalidInput("--header-timeout and --idle-timeout must be positive")
    if args.max_connections < 0 or args.max_connections_per_client < 0:
        raise InvalidInput("--max-connections and --max-connections-per-client must be >= 0")
    if args.max_header_bytes < 1024:
        raise InvalidInput("--max-header-bytes must be at least 1024")
    return ConnectionLimits(
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_per_client=args.max_connections_per_client,
        max_header_bytes=args.max_header_bytes,
    ).resolved()


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidInput(f"--listen expects HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def run(args: argparse.Namespace, on_demand: OnDemandFactory | None = None) -> int:
    """Serve until SIGTERM/SIGINT. Raises ``NixImageError`` for bad settings (the CLI's)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_from_args(args, on_demand)  # secrets are made here, before any fork
    host, port = parse_listen(args.listen)
    factory.parse_storage_url(args.storage)
    connection_limits(args)
    if args.workers == 1:
        return asyncio.run(serve(args, settings, host, port))
    return _fork_workers(args, settings, host, port)


async def serve(args: argparse.Namespace, settings: AppSettings, host: str, port: int) -> int:
    from aiohttp import web

    from niximage_registry import accesslog
    from niximage_registry.app import make_app
    from niximage_registry.runner import JsonErrorsRunner

    storage = factory.open_storage(args.storage, retry_deadline=args.storage_deadline)
    app = make_app(storage, settings)
    limits = connection_limits(args)
    runner = JsonErrorsRunner(
        app,
        limits=limits,
        handle_signals=False,
        shutdown_timeout=args.shutdown_timeout,
        access_log_class=accesslog.JsonAccessLogger,
        access_log=accesslog.configure(not args.no_access_log),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=args.workers > 1, backlog=limits.backlog)
        await site.start()
        bound = runner.addresses[0]
        listening = {
            "event": "listening",
            "address": f"{bound[0]}:{bound[1]}",
            "pid": os.getpid(),
            "storage": storage.url,
        }
        # One write: stderr writes through, and print() sends the newline separately, so
        # the lines of several workers sharing the stream would interleave.
        sys.stderr.write(json.dumps(listening) + "\n")
        sys.stderr.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: finishing in-flight responses")
    finally:
        await _stop(runner, app, args.shutdown_timeout)
        accesslog.SINK.flush()
        storage.close()
    return 0


async def _stop(runner: web.AppRunner, app: web.Application, timeout: float) -> None:
    """Stop within ``timeout`` seconds in all. aiohttp waits up to its shutdown timeout
    for each in-flight response and then as long again for the cancelled handler, so a
    slow client would hold a SIGTERM for twice the time asked: past ``timeout`` the
    remaining connections are cut, and the app's cleanup (on-demand builds are killed)
    still runs."""
    try:
        async with asyncio.timeout(timeout):
            await runner.cleanup()
    except TimeoutError:
        log.warning("shutdown: cut the responses still running after %.0f s", timeout)
        with contextlib.suppress(Exception):  # it may have begun before the cut
            await app.cleanup()


def _fork_workers(args: argparse.Namespace, settings: AppSettings, host: str, port: int) -> int:
    if port == 0:
        raise InvalidInput("--workers > 1 needs a fixed port")
    children: list[int] = []
    for index in range(args.workers):
        pid = os.fork()
        if pid == 0:
            worker = dataclasses.replace(settings, worker=str(index))
            code = 1
            try:
                code = asyncio.run(serve(args, worker, host, port))
            finally:
                os._exit(code)
        children.append(pid)

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m niximage_registry``: the registry alone, without on-demand builds."""
    parser = argparse.ArgumentParser(prog="niximage serve")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except NixImageError as exc:
        print(f"niximage serve: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1


if __name__ == "__main__":
    sys.exit(main())
