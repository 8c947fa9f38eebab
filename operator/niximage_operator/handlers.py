"""kopf handlers: decorators and the translation to kopf's vocabulary, nothing else.

Imports kopf, reconciling, podspec and observations. Registers into kopf's default
registry when imported (running.py imports it). Every handler finds its settings in
``memo.context`` (running.py puts them there at start), never at import time.

- A NixImage is reconciled when created, when its spec changes, when the operator
  (re)starts, and when ``status.builderPod``/``builderPhase`` change: the pod handler
  below writes them (and only it) when a builder pod the NixImage waits for moves on.
  One function: kopf calls it once per cause, except that a new pod changes both fields
  and so calls it twice (kopf deduplicates by handler id, which includes the field); it is
  idempotent, and the second call finds nothing to change.
- Its status goes through ``patch.status``: kopf sends it to the ``/status`` subresource.
- Transient trouble (a retry after backoff, a wait for a build slot, storage) raises
  ``kopf.TemporaryError`` with a delay; permanent failures are reported and not raised,
  so nothing retries until the spec changes.
- NixImages with ``spec.follow`` are tracked for the operator's follow loop (running.py),
  which writes ``status.follow``; a new revision (or a resolution problem) wakes the
  reconcile.
- No finalizer: deleting a NixImage, its namespace, or uninstalling the operator first
  never waits for the operator. ``forget`` removes the tags of a NixImage the watch shows
  deleted; the sweep (ownership.py) removes those of NixImages deleted while no operator
  watched. kopf removes the finalizer of earlier versions by itself. Builder pods go with
  their owners through the garbage collector.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kopf

from niximage_core.errors import NixImageError
from niximage_operator import observations, podspec, reconciling

NIXIMAGES = (podspec.GROUP, podspec.VERSION, podspec.PLURAL)
PODS = ("v1", "pods")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The service account in a pod, else ``$KUBECONFIG`` as it is when the operator starts."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.index(*PODS, labels=podspec.POD_LABELS)
def builder_pods(*, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """Builder pods by (namespace, build key)."""
    return reconciling.index_pod(body)


@kopf.index(*NIXIMAGES)
def images_by_key(*, body: kopf.Body, memo: Any, **_: Any) -> dict[Any, Any]:
    """NixImages by (namespace, build key), for the pod handler's fan-out. Called for every
    NixImage the watch shows, it also keeps the followed ones for the follow loop
    (running.py; ``forget`` drops the deleted): a handler of its own would cost a call and
    a log line per event, and a kopf timer would put a finalizer on them."""
    reconciling.track_followed(memo.context, body, deleted=False)
    return reconciling.index_image(body, memo.context.package_sources)


def _pods_of(index: kopf.Index[Any, Any]) -> reconciling.PodsOf:
    def pods_of(namespace: str, key: str) -> Iterable[observations.PodObservation]:
        return list(index.get((namespace, key), ()))

    return pods_of


@kopf.on.resume(*NIXIMAGES)
@kopf.on.create(*NIXIMAGES)
@kopf.on.update(*NIXIMAGES, field="spec")
@kopf.on.field(*NIXIMAGES, field="status.builderPod")
@kopf.on.field(*NIXIMAGES, field="status.builderPhase")
@kopf.on.field(*NIXIMAGES, field="status.follow.revision")
@kopf.on.field(*NIXIMAGES, field="status.follow.message")
async def reconcile(
    *, body: kopf.Body, patch: kopf.Patch, memo: Any, retry: int, **kwargs: Any
) -> None:
    pods: kopf.Index[Any, Any] = kwargs["builder_pods"]  # indexes arrive as kwargs
    outcome = await reconciling.reconcile(
        memo.context,
        body,
        _pods_of(pods),
        lambda: [pod for store in pods.values() for pod in store],
        retry,
    )
    _report(body, patch, memo, outcome)
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(outcome.retry_message, delay=outcome.retry_after)


def _report(body: kopf.Body, patch: kopf.Patch, memo: Any, outcome: reconciling.Reconciled) -> None:
    for name, value in outcome.status.items():
        patch.status[name] = value
    for event in outcome.events:
        post = kopf.warn if event.warning else kopf.info
        post(body, reason=event.reason, message=event.message)
        kind = "Warning" if event.warning else "Normal"
        memo.context.metrics.condition_changes.labels(event.reason, kind).inc()


def _deleted(*, type: str, **_: Any) -> bool:
    return type == "DELETED"


@kopf.on.event(*NIXIMAGES, when=_deleted)
async def forget(*, body: kopf.Body, memo: Any, logger: Any, **_: Any) -> None:
    reconciling.track_followed(memo.context, body, deleted=True)
    try:
        await reconciling.forget(memo.context, body)
    except NixImageError as exc:  # the next sweep removes it
        logger.warning(f"cannot remove the tag from storage yet: {exc}")


@kopf.on.event(*PODS, labels=podspec.POD_LABELS)
async def builder_pod_changed(*, type: str, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    images: kopf.Index[Any, Any] = kwargs["images_by_key"]

    def images_of(namespace: str, key: str) -> Iterable[reconciling.ImageEntry]:
        return list(images.get((namespace, key), ()))

    pods: kopf.Index[Any, Any] = kwargs["builder_pods"]
    await reconciling.report_pod(memo.context, body, type == "DELETED", images_of, _pods_of(pods))
    memo.context.metrics.builder_pods_running.set(_running(pods))


@kopf.on.probe(id="buildSlots")
def build_slots(**kwargs: Any) -> int:
    """Liveness report: builder pods running now."""
    return _running(kwargs["builder_pods"])


def _running(pods: kopf.Index[Any, Any]) -> int:
    return sum(1 for store in pods.values() for pod in store if pod.active)
