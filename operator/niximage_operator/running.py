"""Running the operator: kopf's settings and the kopf operator itself, in this process.

Imports kopf, handlers (which registers them), reconciling, collecting and settings.
kopf runs in-process with the handlers module imported by name (never ``kopf run
path.py``, which would put this package's folder on ``sys.path``: see the README's
Layout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import kopf

from niximage_core.errors import NixImageError
from niximage_operator import collecting, handlers, podspec, reconciling
from niximage_operator.kube import KubeError
from niximage_operator.pullsecrets import PullSecrets
from niximage_operator.settings import OperatorSettings

COMPONENT = "niximage-operator"
FOLLOW_TICK = 5.0
"""Seconds between passes over followed NixImages; each resolves its reference only once its
own ``spec.follow.interval`` has passed, so this bounds the lateness, not the rate."""

logger = logging.getLogger(__name__)


def kopf_settings(config: OperatorSettings) -> kopf.OperatorSettings:
    """kopf's knobs, each set for a reason."""
    settings = kopf.OperatorSettings()
    # Our own names for what kopf stores on our objects, so they read as ours and do not
    # mix with another kopf operator's on the same resources.
    settings.persistence.finalizer = f"{podspec.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=podspec.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=podspec.GROUP, key="last-handled-configuration"
    )
    # Only builder pods: the API server filters, so the operator never holds every pod
    # of the cluster in memory.
    settings.watching.label_selectors[handlers.PODS] = podspec.POD_SELECTOR
    # A watch request ends after this long and kopf resumes it from the last version. It
    # travels as ?timeoutSeconds=N, which the API server parses as an integer.
    settings.watching.server_timeout = int(config.watch_timeout)
    settings.watching.client_timeout = config.watch_timeout + 60
    # Events come only from kopf.info/warn calls (one per condition change), never from
    # log lines; they carry the operator's name.
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = COMPONENT
    settings.posting.reporting_instance = socket.gethostname()
    # One replica (Deployment strategy Recreate): no peering objects, no peering RBAC.
    settings.peering.standalone = True
    return settings


async def operate(
    config: OperatorSettings,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    context: reconciling.Context | None = None,
) -> None:
    """Run until stopped (``stop_flag`` or cancellation); with ``gc_interval``, garbage
    collection runs beside kopf in the same event loop."""
    context = context or reconciling.Context.open(config)
    sweeper = asyncio.create_task(_sweep_forever(context, config.sweep_interval))
    follower = asyncio.create_task(_follow_forever(context, FOLLOW_TICK))
    renewer: asyncio.Task[None] | None = None
    if context.pull_secrets is not None:
        every = min(config.sweep_interval, config.pull_token_seconds / 4)
        renewer = asyncio.create_task(_renew_pull_secrets_forever(context.pull_secrets, every))
    collector: asyncio.Task[None] | None = None
    if config.gc_interval is not None:
        schedule = collecting.Schedule(config.gc_interval, config.gc_grace)
        collector = asyncio.create_task(
            collecting.run_forever(context.storage, schedule, metrics=context.metrics)
        )
    metrics_server = None
    if config.metrics_port is not None:
        metrics_server = context.metrics.serve(config.metrics_port)
    try:
        await kopf.operator(
            registry=kopf.get_default_registry(),
            settings=kopf_settings(config),
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            liveness_endpoint=config.liveness,
            memo=kopf.Memo(context=context),
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        for task in (sweeper, follower, collector, renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        context.close()


async def _sweep_forever(context: reconciling.Context, interval: float) -> None:
    """The tags of NixImages deleted while no operator watched: at start, then every
    ``interval``. A failure (storage or API away) is logged and tried again next time."""
    while True:
        try:
            await reconciling.sweep(context)
        except (NixImageError, KubeError) as exc:
            logger.warning("sweep for tags of deleted NixImages failed: %s", exc)
        await asyncio.sleep(interval)


async def _follow_forever(context: reconciling.Context, tick: float) -> None:
    """Followed NixImages: every ``tick``, resolve each reference whose own interval has
    passed (``reconciling.follow``)."""
    while True:
        await asyncio.sleep(tick)
        try:
            await reconciling.follow_all(context)
        except Exception:  # a bug must not stop following for the operator's lifetime
            logger.exception("following package sources failed")


async def _renew_pull_secrets_forever(secrets: PullSecrets, interval: float) -> None:
    """Renew the pull Secrets' tokens that are due, every ``interval`` (a quarter of their
    lifetime at most, so a token is renewed well before it expires)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await secrets.refresh()
        except KubeError as exc:
            logger.warning("renewing pull Secrets failed: %s", exc)


def run(config: OperatorSettings) -> None:
    """Block until the operator exits (SIGINT/SIGTERM stop it gracefully)."""
    asyncio.run(operate(config))
