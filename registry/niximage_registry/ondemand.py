"""On-demand images (``--on-demand``): Nixery-style names built on the first pull.

``/v2/shell/git/htop/manifests/latest`` → ``names.parse_image_name`` → an image spec with
the package source pinned at startup → the build function in a build thread →
``tags/_pulls/shell/git/htop/_tags/latest`` recorded (``layout.record_tag``) → served from storage
like any stored tag.

The registry never imports the build pipeline: the ``niximage`` command line hands it a
``BuildFunction`` (the builder's ``build_target`` with its Nix settings), tests a fake.

- **Single flight**: one build per build key, however many pulls wait for it; the task
  belongs to this object, not to a request, and waiters ``shield`` it, so a client that
  disconnects cancels only its own wait.
- **Bounded**: at most ``max_builds`` run at once (the build pool's size), at most
  ``max_queued`` more wait; beyond that 429 ``TOOMANYREQUESTS`` with ``Retry-After``.
- **Patience**: a request waits ``wait`` seconds at most, then gets 429 with
  ``Retry-After`` while the build goes on; its next pull finds the tag. Nix itself has a
  wall-clock limit (``NixSettings.timeout``) and is killed on shutdown, so nothing stays
  wedged, and no lock is held across an ``await``.
- **Failures**: missing packages are 404 ``MANIFEST_UNKNOWN`` naming them; other
  deterministic failures (evaluation, build) 404 with Nix's message; both are remembered
  for ``failure_ttl`` seconds so repeated pulls do not re-run Nix. Transient failures
  (timeout, storage) answer 503 and are not remembered.
- Only the tags in ``tags`` (``latest``) are built; other tags are served if stored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from niximage_core import imagespec, layout, names
from niximage_core.digest import Digest
from niximage_core.errors import (
    InvalidInput,
    NixFailure,
    NixImageError,
    PackagesNotFound,
)
from niximage_core.result import BuildResult
from niximage_core.sources import PackageSource
from niximage_core.storage.base import Storage
from niximage_registry.content import Content, TtlCache
from niximage_registry.errors import Code, RegistryError
from niximage_registry.metrics import Metrics

log = logging.getLogger(__name__)

FAILURE_REASONS = {
    "EvalError": "the package set could not be evaluated for these packages",
    "BuildFailed": "a package of the image failed to build",
    "InvalidInput": "the image name is not a valid package list",
}
"""What a client is told of a deterministic failure (the details go to the log)."""

BuildFunction = Callable[[imagespec.BuildTarget, Storage, threading.Event], BuildResult]
"""Build one image (or an index) into the storage; the event, once set, cancels the build
(shutdown)."""


@dataclass(frozen=True)
class OnDemandSettings:
    source: PackageSource
    """Pinned once at startup, by whoever supplies the build function."""
    build: BuildFunction
    max_builds: int = 2
    max_queued: int = 16
    wait: float = 600.0
    failure_ttl: float = 60.0
    tags: tuple[str, ...] = ("latest",)


class OnDemand:
    def __init__(
        self,
        storage: Storage,
        content: Content,
        settings: OnDemandSettings,
        metrics: Metrics,
    ) -> None:
        if settings.max_builds < 1:
            raise InvalidInput("--max-builds must be at least 1")
        self._storage = storage
        self._content = content
        self.settings = settings
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(settings.max_builds, thread_name_prefix="niximage-build")
        self._tasks: dict[str, asyncio.Task[Digest]] = {}
        self._failures: TtlCache[str, RegistryError] = TtlCache(settings.failure_ttl, 10_000)
        self._cancel = threading.Event()

    def accepts(self, tag: str) -> bool:
        return tag in self.settings.tags

    def spec_for(self, name: str) -> imagespec.BuildTarget:
        try:
            parsed = names.parse_image_name(name)
            return imagespec.make_target(
                list(parsed.packages), self.settings.source, parsed.architectures
            )
        except InvalidInput as exc:
            raise RegistryError(Code.NAME_INVALID, str(exc), {"name": name}) from None

    async def ensure(self, name: str, tag: str) -> Digest:
        """The manifest digest of ``name``, building it first if needed; records the tag."""
        spec = self.spec_for(name)
        key = spec.build_key()
        failure = self._failures.get(key)
        if failure is not None:
            raise failure
        task = self._tasks.get(key)
        started = task is None
        if task is None:
            if len(self._tasks) >= self.settings.max_builds + self.settings.max_queued:
                raise RegistryError(
                    Code.TOOMANYREQUESTS,
                    "too many images are being built; retry later",
                    headers={"Retry-After": "30"},
                )
            task = asyncio.create_task(self._run(key, spec, name, tag), name=f"build {name}")
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        self._metrics.build_waiters.labels(str(started).lower(), self._metrics.worker).inc()
        try:
            digest = await asyncio.wait_for(asyncio.shield(task), self.settings.wait)
        except TimeoutError:
            raise RegistryError(
                Code.TOOMANYREQUESTS,
                f"image {name} is still being built; retry in a moment",
                headers={"Retry-After": "10"},
            ) from None
        if not started:
            # Another name may share the build key (``jq/bash`` and ``bash/jq``).
            await self._record_tag(name, tag, digest)
        return digest

    async def _record_tag(self, name: str, tag: str, digest: Digest) -> None:
        if await self._content.tag(name, tag) != digest:
            path = layout.tag_path(name, tag, pulled=True)
            await self._content.run(self._storage.write, path, str(digest).encode())
        self._content.remember_tag(name, tag, digest)

    async def _run(self, key: str, spec: imagespec.BuildTarget, name: str, tag: str) -> Digest:
        loop = asyncio.get_running_loop()
        running = self._metrics.builds_running.labels(self._metrics.worker)
        running.inc()
        started = time.monotonic()
        outcome = "error"
        try:
            digest = await loop.run_in_executor(self._pool, self._build_and_tag, spec, name, tag)
            outcome = "ok"
            self._content.remember_tag(name, tag, digest)
            log.info("built %s:%s → %s in %.1f s", name, tag, digest, time.monotonic() - started)
            return digest
        except PackagesNotFound as exc:
            outcome = "missing"
            raise self._remember(
                key,
                RegistryError(
                    Code.MANIFEST_UNKNOWN,
                    f"packages not found: {', '.join(exc.names)}",
                    {"missingPackages": exc.names},
                ),
            ) from None
        except (NixFailure, InvalidInput) as exc:
            outcome = "failed"
            # Nix's text names store paths and the builder's system features: the log
            # keeps it, the client gets the kind of failure.
            log.warning("on-demand build of %s failed: %s", name, exc)
            reason = FAILURE_REASONS.get(exc.kind, "the build failed")
            raise self._remember(
                key,
                RegistryError(
                    Code.MANIFEST_UNKNOWN,
                    f"building {name} failed: {reason} ({exc.kind}; the registry's log has "
                    "the details)",
                    {"kind": exc.kind},
                ),
            ) from None
        except NixImageError as exc:
            log.error("on-demand build of %s failed: %s", name, exc)
            raise RegistryError(
                Code.UNAVAILABLE,
                f"building {name} failed ({exc.kind}); retry later",
                headers={"Retry-After": "30"},
            ) from None
        finally:
            running.dec()
            self._metrics.builds.labels(outcome, self._metrics.worker).inc()
            self._metrics.build_duration.labels(self._metrics.worker).observe(
                time.monotonic() - started
            )

    def _finished(self, key: str, task: asyncio.Task[Digest]) -> None:
        self._tasks.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: waiters that timed out are gone, no warning

    def _remember(self, key: str, error: RegistryError) -> RegistryError:
        self._failures.put(key, error)
        return error

    def _build_and_tag(self, spec: imagespec.BuildTarget, name: str, tag: str) -> Digest:
        """Runs in a build thread: the whole pipeline, then the tag (after its blobs)."""
        result = self.settings.build(spec, self._storage, self._cancel)
        layout.record_tag(self._storage, name, tag, result, pulled=True)
        assert result.manifestDigest is not None
        return Digest.parse(result.manifestDigest)

    async def close(self) -> None:
        """Shutdown: kill running Nix processes, fail waiters, release the threads."""
        self._cancel.set()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
