"""Reconciling NixImages and following builder pods: the pure decisions, put to work.

Imports the pure modules, kube and the builder's storage and build helpers; never kopf.
Handlers (handlers.py) pass in what kopf knows (the body, the indexes of builder pods and
NixImages) and turn a ``Reconciled`` into a status patch, events and a retry. Blocking
storage calls run in threads so one slow bucket does not stall every other resource.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from niximage_core import closurediff, inspection, layout, resource
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NixImageError
from niximage_core.result import BuildResult
from niximage_core.storage import factory
from niximage_core.storage.base import Storage
from niximage_operator import (
    conditions,
    decisions,
    gitremote,
    observations,
    ownership,
    podspec,
    specs,
    tracking,
)
from niximage_operator.kube import AlreadyExists, Kube, KubeError
from niximage_operator.metrics import Metrics
from niximage_operator.observations import BuildFailure, PodObservation
from niximage_operator.pullsecrets import PullSecrets
from niximage_operator.settings import OperatorSettings
from niximage_operator.sourcepolicy import SourceNotAllowed

log = logging.getLogger(__name__)
RESERVATION_TTL = 120.0
"""Seconds a pod we created counts as running before the watch has shown it to us."""
KUBE_RETRY_DELAY = 10.0
REFUSED = (400, 403, 422)
"""API answers to a pod creation that the cluster's set-up causes (a quota, Pod Security
admission, a missing service account, a webhook): the NixImage says so in its status.
Other API errors are the operator's own trouble, logged and retried."""

PodsOf = Callable[[str, str], Iterable[PodObservation]]
"""Builder pods of (namespace, build key), from kopf's index."""


class Slots:
    """Counts builder pods that hold a build slot, cluster-wide, in this operator.

    The watch shows pods a moment after they are created, so pods created here count
    from creation until the watch has them (or a while has passed). The lock makes
    "count, then create" one step across concurrently running handlers.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = asyncio.Lock()
        self._reserved: dict[tuple[str, str], float] = {}

    def in_use(self, pods: Iterable[PodObservation], now: float) -> int:
        pods = list(pods)
        seen = {(pod.namespace, pod.name) for pod in pods}
        active = {(pod.namespace, pod.name) for pod in pods if pod.active}
        self._reserved = {
            name: since
            for name, since in self._reserved.items()
            if name not in seen and now - since < RESERVATION_TTL
        }
        return len(active | set(self._reserved))

    def reserve(self, namespace: str, name: str, now: float) -> None:
        self._reserved[(namespace, name)] = now


@dataclass
class Context:
    """What every handler needs; lives in kopf's memo for the operator's lifetime."""

    settings: OperatorSettings
    package_sources: specs.PackageSources
    storage: Storage
    kube: Kube
    slots: Slots
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    metrics: Metrics = field(default_factory=Metrics)
    pull_secrets: PullSecrets | None = None
    followed: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """NixImages with ``spec.follow`` on, by (namespace, name), as last seen."""

    @classmethod
    def open(cls, settings: OperatorSettings) -> Context:
        sources = specs.PackageSources.configure(
            settings.default_package_source,
            settings.package_sources,
            settings.follow_min_interval,
            settings.allowed_sources,
        )
        kube = Kube.from_environment()
        pull_secrets = None
        if settings.pull_secrets:
            pull_secrets = PullSecrets(
                kube, settings.registry, settings.puller_cluster_role, settings.pull_token_seconds
            )
        return cls(
            settings=settings,
            package_sources=sources,
            storage=factory.open_storage(settings.storage),
            kube=kube,
            slots=Slots(settings.max_concurrent_builds),
            pull_secrets=pull_secrets,
        )

    def close(self) -> None:
        self.storage.close()
        self.kube.close()


@dataclass(frozen=True)
class Reconciled:
    """What one reconcile wants written and said."""

    status: dict[str, Any]
    """A merge patch for ``.status``; empty when nothing changed."""
    events: list[conditions.Event]
    retry_after: float | None = None
    retry_message: str = ""


@dataclass(frozen=True)
class ImageEntry:
    """A NixImage in the by-build-key index."""

    name: str
    builder: tuple[str | None, str | None]
    """``(status.builderPod, status.builderPhase)``: the last news it was given."""


def index_image(body: Mapping[str, Any], sources: specs.PackageSources) -> dict[Any, ImageEntry]:
    """The by-build-key index entry of a NixImage (none for an invalid spec)."""
    try:
        target = specs.resolve(body, sources)
    except (InvalidInput, specs.AwaitingRevision):
        return {}
    status = body.get("status") or {}
    builder = (status.get("builderPod"), status.get("builderPhase"))
    return {(target.namespace, target.key): ImageEntry(target.name, builder)}


def index_pod(body: Mapping[str, Any]) -> dict[Any, PodObservation]:
    observation = observations.observe(body)
    if observation is None:
        return {}
    return {(observation.namespace, observation.key): observation}


async def reconcile(
    ctx: Context,
    body: Mapping[str, Any],
    pods_of: PodsOf,
    all_pods: Callable[[], Iterable[PodObservation]],
    retry: int,
) -> Reconciled:
    """Bring one NixImage's build and status in line with its spec."""
    old = dict(body.get("status") or {})
    generation = int((body.get("metadata") or {}).get("generation") or 0)
    try:
        target = specs.resolve(body, ctx.package_sources)
    except SourceNotAllowed as exc:
        report = conditions.invalid(str(exc), "SourceNotAllowed")
        return _finish(ctx, old, report, None, generation)
    except InvalidInput as exc:
        return _finish(ctx, old, conditions.invalid(str(exc)), None, generation)
    except specs.AwaitingRevision as exc:
        return _finish(ctx, old, _resolving(old, str(exc)), None, generation)
    try:
        outcome = await _reconcile_target(ctx, body, target, old, pods_of, all_pods, retry)
    except NixImageError as exc:  # storage, seen by the operator itself
        return _storage_trouble(ctx, old, target, exc, retry)
    except KubeError as exc:
        return Reconciled({}, [], KUBE_RETRY_DELAY, str(exc))
    return await _with_pull_secret(ctx, target.namespace, old, outcome)


async def _with_pull_secret(
    ctx: Context, namespace: str, old: Mapping[str, Any], outcome: Reconciled
) -> Reconciled:
    """Name the namespace's pull Secret in the status, once it holds a good token. A
    failure is an event, not a failed reconcile: the image is built all the same, and the
    next reconcile or sweep tries again."""
    if ctx.pull_secrets is None:
        if old.get("pullSecret"):  # turned off: the Secret is no longer kept
            return dataclasses.replace(outcome, status={**outcome.status, "pullSecret": None})
        return outcome
    try:
        name = await ctx.pull_secrets.ensure(namespace)
    except KubeError as exc:
        event = conditions.Event(True, "PullSecretFailed", f"cannot keep the pull Secret: {exc}")
        return dataclasses.replace(outcome, events=[*outcome.events, event])
    if old.get("pullSecret") == name:
        return outcome
    return dataclasses.replace(outcome, status={**outcome.status, "pullSecret": name})


async def _reconcile_target(
    ctx: Context,
    body: Mapping[str, Any],
    target: specs.Target,
    old: dict[str, Any],
    pods_of: PodsOf,
    all_pods: Callable[[], Iterable[PodObservation]],
    retry: int,
) -> Reconciled:
    if _ready_for(old, target) and await asyncio.to_thread(_tag_names, ctx.storage, target, old):
        # Nothing to do, and nothing to touch: a tagged image is a gc root. An operator
        # restart costs one read per NixImage, not a touch of every blob (a rewrite each
        # on GCS) as looking the build up would.
        return Reconciled({}, [])
    result, stored = await _stored(ctx, target)
    previous = int(old.get("attempts") or 0) if old.get("buildKey") == target.key else 0
    pods = tuple(pods_of(target.namespace, target.key))
    # More than one round only when another creator beat us to the pod: decide again
    # with that pod, which may already have finished.
    for _ in range(3):
        world = decisions.World(target, result, stored, pods, previous, ctx.clock())
        decision = decisions.decide(
            world,
            ctx.settings.max_attempts,
            lambda failed: ctx.settings.retry_backoff(failed, target.key),
        )
        if not isinstance(decision, decisions.Start):
            return await _follow(ctx, body, target, old, decision)
        try:
            started = await _start(ctx, body, target, decision, all_pods)
        except KubeError as exc:
            if exc.status not in REFUSED:
                raise
            delay = ctx.settings.retry_backoff(retry + 1, target.key)
            name = podspec.pod_name(target.key, decision.attempt)
            message = f"the API server refused builder pod {name}: {exc}; retrying in {delay:.0f} s"
            report = conditions.builder_rejected(message)
            return _finish(ctx, old, report, target, retry_after=delay)
        if isinstance(started, Reconciled):
            return started
        pod, created = started
        if pod.key != target.key:
            clash = BuildFailure(
                "BuildFailed",
                f"pod {pod.namespace}/{pod.name} belongs to build key {pod.key}, not {target.key}",
                transient=False,
            )
            return _finish(ctx, old, conditions.failed(clash, None, previous), target)
        if created:
            done = _finish(ctx, old, conditions.waiting(pod, decision.attempt), target)
            if decision.after is None:
                return done
            # The failed attempt may never have shown in the status (its backoff had already
            # passed): say what happened in an event.
            retried = conditions.Event(
                True,
                decision.after.reason,
                f"attempt {decision.attempt - 1} failed: {decision.after.message}; "
                f"started attempt {decision.attempt}",
            )
            return dataclasses.replace(done, events=[retried, *done.events])
        pods = (*(p for p in pods if p.name != pod.name), pod)
    return Reconciled({}, [], 1.0, "builder pods keep changing; looking again")


async def _follow(
    ctx: Context,
    body: Mapping[str, Any],
    target: specs.Target,
    old: dict[str, Any],
    decision: decisions.Decision,
) -> Reconciled:
    """Report a decision that needs no new pod."""
    match decision:
        case decisions.UseResult(result=result, pod=pod, attempts=attempts):
            await asyncio.to_thread(_record_tag, ctx.storage, target, result, old)
            report = conditions.ready(target, result, pod, attempts, ctx.settings.registry)
            return await _summarised(ctx, target, old, result, _finish(ctx, old, report, target))
        case decisions.Wait(pod=pod, attempts=attempts):
            await _adopt(ctx, body, pod)
            return _finish(ctx, old, conditions.waiting(pod, attempts), target)
        case decisions.Backoff(failure=failure, pod=pod, attempts=attempts, delay=delay):
            await _adopt(ctx, body, pod)
            report = conditions.backing_off(failure, pod, attempts, delay)
            return _finish(ctx, old, report, target, retry_after=delay)
        case decisions.Fail(failure=failure, pod=pod, attempts=attempts):
            if pod is not None:
                await _adopt(ctx, body, pod)
            if target.revision is not None and old.get("digest"):
                # A newer revision that does not build: the tag stays, and says so.
                failure = dataclasses.replace(
                    failure,
                    message=f"revision {target.revision[:12]}: {failure.message}; the tag "
                    f"still names {old['digest']}",
                )
            done = _finish(ctx, old, conditions.failed(failure, pod, attempts), target)
            entry = {"outcome": "Failed", "message": failure.message[:1000]}
            return _with_history(ctx, target, old, done, entry)
    raise AssertionError(f"unexpected decision {decision!r}")


async def _summarised(
    ctx: Context,
    target: specs.Target,
    old: Mapping[str, Any],
    result: BuildResult,
    done: Reconciled,
) -> Reconciled:
    """A Ready that moved the image to a new digest: its closure diff in
    ``status.lastChange`` and an event; and, when following, the revision's history entry."""
    before, after = old.get("digest"), result.manifestDigest
    summary = ""
    if isinstance(before, str) and after and before != after:
        arch = target.architectures[0]
        change = await asyncio.to_thread(_closure_change, ctx.storage, before, after, arch)
        if change is not None:
            summary = change.summary()
            moved = f"revision {target.revision[:12]}: " if target.revision else ""
            event = conditions.Event(False, "ClosureChanged", f"{moved}{summary}")
            status = {**done.status, "lastChange": conditions.closure_change(change, before, after)}
            done = dataclasses.replace(done, status=status, events=[*done.events, event])
    entry = {"outcome": "Succeeded", "digest": after, "message": summary}
    return _with_history(ctx, target, old, done, entry)


def _closure_change(
    storage: Storage, before: str, after: str, arch: str
) -> closurediff.ClosureDiff | None:
    """The diff of two images' closures, from their SBOMs; None when one has none (built
    before niximage wrote them) or storage cannot say: the diff is news, not a condition."""
    try:
        old_image = inspection.platform_image(storage, Digest.parse(before), arch)
        new_image = inspection.platform_image(storage, Digest.parse(after), arch)
        return inspection.diff_images(storage, old_image, new_image)
    except NixImageError as exc:
        log.info("no closure diff of %s → %s: %s", before, after, exc)
        return None


def _with_history(
    ctx: Context,
    target: specs.Target,
    old: Mapping[str, Any],
    done: Reconciled,
    entry: Mapping[str, Any],
) -> Reconciled:
    """Add the followed revision's outcome to ``status.history`` (once per revision)."""
    if target.revision is None or target.follow is None:
        return done
    full = {"revision": target.revision, "time": observations.format_time(ctx.clock()), **entry}
    history = tracking.with_entry(
        old.get("history") or [], {k: v for k, v in full.items() if v}, target.follow.historyLimit
    )
    if history is None:
        return done
    return dataclasses.replace(done, status={**done.status, "history": history})


def _resolving(old: Mapping[str, Any], message: str) -> conditions.Report:
    """Before the first revision: why there is none yet, if the follow loop said."""
    problem = ((old.get("follow") or {}).get("message")) or ""
    if problem:
        return conditions.resolving(f"{problem}; trying again every interval", True)
    return conditions.resolving(message, False)


FOLLOWERS = 8
"""References resolved at once (each a ``git ls-remote``)."""


def track_followed(ctx: Context, body: Mapping[str, Any], deleted: bool) -> None:
    """Keep ``ctx.followed`` (the NixImages with ``spec.follow`` on) as the watch shows
    them; ``follow_all`` works through it."""
    metadata = body.get("metadata") or {}
    key = (str(metadata.get("namespace")), str(metadata.get("name")))
    follow_spec = (body.get("spec") or {}).get("follow")
    following = isinstance(follow_spec, Mapping) and follow_spec.get("enabled", True) is not False
    if deleted or not following:
        ctx.followed.pop(key, None)
        return
    ctx.followed[key] = {
        k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status")
    }


async def follow_all(ctx: Context) -> None:
    """One pass of ``follow`` over every followed NixImage, a few at a time; what it finds
    goes to each one's status and events (a failure is logged; the next pass tries again)."""
    limit = asyncio.Semaphore(FOLLOWERS)

    async def one(body: Mapping[str, Any]) -> None:
        metadata = body.get("metadata") or {}
        async with limit:
            outcome = await follow(ctx, body)
            if outcome.status:
                await ctx.kube.patch_image_status(
                    str(metadata.get("namespace")), str(metadata.get("name")), outcome.status
                )
            for event in outcome.events:
                await ctx.kube.post_event(body, event.warning, event.reason, event.message)

    outcomes = await asyncio.gather(
        *(one(body) for body in list(ctx.followed.values())), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, KubeError | NixImageError):
            log.warning("following a package source: %s", outcome)
        elif isinstance(outcome, BaseException):
            raise outcome


async def follow(ctx: Context, body: Mapping[str, Any]) -> Reconciled:
    """Resolve a followed NixImage's reference when its interval has passed; the new
    revision goes to ``status.follow.revision``, which wakes the reconcile."""
    status = body.get("status") or {}
    try:
        image = resource.parse_resource(
            {key: body.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
        )
        source = ctx.package_sources.resolve(image.spec.packageSource)
    except InvalidInput:
        return Reconciled({}, [])  # the reconcile reports the spec's problem
    follow_spec = image.spec.follow
    reference = tracking.moving_reference(source, ctx.settings.nixpkgs_git)
    if follow_spec is None or not follow_spec.enabled or reference is None:
        return Reconciled({}, [])
    state = status.get("follow") or {}
    now = ctx.clock()
    if not tracking.due(state, source, follow_spec.interval_seconds, now):
        return Reconciled({}, [])
    checked = observations.format_time(now)
    try:
        revision = await asyncio.to_thread(gitremote.resolve, reference, ctx.settings.git_timeout)
    except gitremote.RevisionUnresolved as exc:
        events = []
        if state.get("message") != str(exc):
            events = [conditions.Event(True, "RevisionUnresolved", str(exc))]
        failed = {"source": str(source), "checkedAt": checked, "message": str(exc)}
        if state.get("source") != str(source):
            failed["revision"] = None  # another source's commit
        return Reconciled({"follow": failed}, events)
    previous = state.get("revision") if state.get("source") == str(source) else None
    events = []
    if previous and previous != revision:
        message = (
            f"{reference.ref} of {reference.url} moved from {previous[:12]} to {revision[:12]}"
        )
        events = [conditions.Event(False, "RevisionMoved", f"{message}; building it")]
    patch = {"source": str(source), "revision": revision, "checkedAt": checked, "message": None}
    return Reconciled({"follow": patch}, events)


async def _start(
    ctx: Context,
    body: Mapping[str, Any],
    target: specs.Target,
    start: decisions.Start,
    all_pods: Callable[[], Iterable[PodObservation]],
) -> tuple[PodObservation, bool] | Reconciled:
    """Create the builder pod (True), or adopt it if it exists (False); or queue when no
    build slot is free."""
    name = podspec.pod_name(target.key, start.attempt)
    slots = ctx.slots
    async with slots.lock:
        in_use = slots.in_use(all_pods(), time.monotonic())
        if in_use >= slots.limit:
            old = dict(body.get("status") or {})
            report = conditions.queued(in_use, slots.limit, start.attempt, start.after)
            return _finish(ctx, old, report, target, retry_after=ctx.settings.queue_recheck)
        manifest = podspec.builder_pod(target, start.attempt, body, ctx.settings)
        created = True
        try:
            pod = await ctx.kube.create_pod(manifest)
            slots.reserve(target.namespace, name, time.monotonic())
            ctx.metrics.builder_pods_created.inc()
        except AlreadyExists:
            created = False
            found = await ctx.kube.add_pod_owner(target.namespace, name, body)
            if found is None:  # deleted between our create and our read: look again soon
                return Reconciled({}, [], 1.0, f"builder pod {name} vanished, looking again")
            pod = found
    observation = observations.observe(pod)
    if observation is None:
        raise KubeError(0, f"pod {target.namespace}/{name} exists but is not a builder pod")
    return observation, created


async def _adopt(ctx: Context, body: Mapping[str, Any], pod: PodObservation) -> None:
    """Own a builder pod this NixImage relies on, so it lives as long as one owner does."""
    uid = (body.get("metadata") or {}).get("uid")
    if pod.phase != "Deleted" and uid and uid not in pod.owners:
        await ctx.kube.add_pod_owner(pod.namespace, pod.name, body)


async def _stored(
    ctx: Context, target: specs.Target
) -> tuple[BuildResult | None, BuildFailure | None]:
    def read() -> tuple[BuildResult | None, BuildFailure | None]:
        result = layout.cached_result(ctx.storage, target.key)
        if result is not None or not target.pinned:
            return result, None
        raw = ctx.storage.read(layout.build_key_path(target.key))
        try:
            recorded = BuildResult.from_json(raw) if raw is not None else None
        except ValueError:
            recorded = None
        return None, decisions.stored_failure(recorded)

    return await asyncio.to_thread(read)


def _record_tag(
    storage: Storage, target: specs.Target, result: BuildResult, old: Mapping[str, Any]
) -> None:
    """Point ``tags/<namespace>/<name>/<tag>`` at the image; drop a tag the spec left."""
    owner = ownership.Owner(target.namespace, target.name, target.uid, target.tag)
    ownership.record(storage, owner, result)
    previous = previous_tag(old)
    if previous is not None and previous != target.tag:
        ownership.release(storage, dataclasses.replace(owner, tag=previous))


def _digest(result: BuildResult) -> Digest | None:
    return Digest.parse(result.manifestDigest) if result.manifestDigest else None


def previous_tag(status: Mapping[str, Any]) -> str | None:
    """The tag of ``status.image`` (``registry/namespace/name:tag``)."""
    image = status.get("image")
    if not isinstance(image, str) or ":" not in image.rsplit("/", 1)[-1]:
        return None
    return image.rsplit(":", 1)[1]


def _ready_for(old: Mapping[str, Any], target: specs.Target) -> bool:
    """The status says Ready for this very spec (its build key and generation)."""
    ready: Mapping[str, Any] = next(
        (c for c in old.get("conditions") or () if c.get("type") == "Ready"), {}
    )
    return (
        ready.get("status") == "True"
        and old.get("buildKey") == target.key
        and old.get("observedGeneration") == target.generation
    )


def _tag_names(storage: Storage, target: specs.Target, old: Mapping[str, Any]) -> bool:
    """The target's tag in storage names the image the status reports."""
    try:
        tagged = layout.read_tag(storage, target.repository, target.tag)
    except InvalidInput:  # a damaged tag object: the full reconcile rewrites it
        return False
    return tagged is not None and str(tagged) == old.get("digest")


def _storage_trouble(
    ctx: Context, old: dict[str, Any], target: specs.Target, exc: Exception, retry: int
) -> Reconciled:
    settings = ctx.settings
    delay = settings.storage_backoff(retry, target.key)
    message = f"storage {settings.storage}: {exc}; retrying in {delay:.0f} s"
    if _ready_for(old, target):
        # Already Ready for this very spec: a storage blip is no reason to flap.
        return Reconciled({}, [], delay, message)
    report = conditions.storage_unavailable(message)
    return _finish(ctx, old, report, target, retry_after=delay)


def _finish(
    ctx: Context,
    old: dict[str, Any],
    report: conditions.Report,
    target: specs.Target | None,
    generation: int = 0,
    retry_after: float | None = None,
    retry_message: str = "",
) -> Reconciled:
    """The status patch and events that take ``old`` to ``report``."""
    if target is not None:
        generation = target.generation
    key = target.key if target is not None else None
    new = conditions.desired_status(old, report, generation, key, ctx.clock())
    if target is not None:
        # For the Arch column: "amd64", or "amd64,arm64" for an index.
        new["arch"] = ",".join(target.architectures)
    return Reconciled(
        conditions.status_patch(old, new),
        conditions.events(old, new),
        retry_after,
        retry_message or report.ready.message,
    )


async def report_pod(
    ctx: Context,
    pod: Mapping[str, Any],
    deleted: bool,
    images_of: Callable[[str, str], Iterable[ImageEntry]],
    pods_of: PodsOf,
) -> None:
    """Tell the NixImages waiting for a builder pod that its phase changed."""
    observation = observations.observe(pod, deleted=deleted)
    if observation is None:
        return
    namespace, key = observation.namespace, observation.key
    latest = decisions.latest_pod(pods_of(namespace, key))
    if latest is not None and latest.attempt > observation.attempt:
        return  # news of an attempt that a newer one replaced

    def still_wants(image: Mapping[str, Any]) -> bool:
        return any(k == (namespace, key) for k in index_image(image, ctx.package_sources))

    news = (observation.name, observation.phase)
    waiting = [entry.name for entry in images_of(namespace, key) if entry.builder != news]
    outcomes = await asyncio.gather(
        *(ctx.kube.nudge_image(namespace, name, still_wants, *news) for name in waiting),
        return_exceptions=True,
    )
    for outcome in outcomes:  # all were tried; kopf logs the first failure
        if isinstance(outcome, BaseException):
            raise outcome


async def forget(ctx: Context, body: Mapping[str, Any]) -> None:
    """Remove the tags of a deleted NixImage (storage errors propagate)."""
    metadata = body.get("metadata") or {}
    tags = {(body.get("spec") or {}).get("tag"), previous_tag(body.get("status") or {})}
    await asyncio.to_thread(
        ownership.forget,
        ctx.storage,
        str(metadata.get("namespace")),
        str(metadata.get("name")),
        str(metadata.get("uid")),
        [str(tag) for tag in tags if tag],
    )


async def sweep(ctx: Context) -> list[ownership.Owner]:
    """Remove the tags of NixImages deleted while no operator watched."""
    namespaces = ctx.settings.namespaces

    def live_uids() -> set[str]:
        return ctx.kube.image_uids_blocking(namespaces)

    return await asyncio.to_thread(ownership.sweep, ctx.storage, live_uids)
