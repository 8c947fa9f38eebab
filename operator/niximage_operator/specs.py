"""What a NixImage asks for: its spec resolved into the builder's image spec and build key.

Pure; imports the core's resource, sources, imagespec and errors modules, and tracking. The
operator never runs Nix, yet its build key must equal the one ``niximage build`` computes
in the pod, or a cached result is never found and a shared build is never shared. So the
package source is resolved here to exactly what the builder will use: a ``path:`` source
must be one the operator is configured with, pinned by its NAR hash, and every source
must survive the trip through the builder's command line unchanged. A followed source
(``spec.follow``) is pinned to the revision the operator last resolved it to
(``status.follow.revision``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from niximage_core import imagespec, reference, resource, sources
from niximage_core.errors import InvalidInput
from niximage_core.resource import Follow
from niximage_core.sources import PathSource
from niximage_operator import tracking
from niximage_operator.sourcepolicy import SourcePolicy

Source = sources.PathSource | sources.NixpkgsSource | sources.GitSource
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class PackageSources:
    """The package sources the operator can hand to builders."""

    default: Source
    paths: tuple[PathSource, ...]
    """Pinned local sources present in the builder image, by path."""
    follow_min_interval: float = 60.0
    """The shortest ``spec.follow.interval`` accepted."""
    policy: SourcePolicy | None = None
    """Which sources NixImages may ask for (None: any)."""

    @classmethod
    def configure(
        cls,
        default: str,
        extra_paths: Iterable[str] = (),
        follow_min_interval: float = 60.0,
        allowed: Iterable[str] = (),
    ) -> PackageSources:
        """Parse the operator's configuration; raises ``InvalidInput`` naming the problem."""
        parsed_default = sources.parse_source(default)
        parsed = [sources.parse_source(text) for text in extra_paths]
        if isinstance(parsed_default, PathSource):
            parsed.insert(0, parsed_default)
        paths: dict[str, PathSource] = {}
        for source in parsed:
            if not isinstance(source, PathSource):
                raise InvalidInput(f"package source {source} is not a path: source")
            if not source.pinned:
                raise InvalidInput(
                    f"package source {source} is not pinned: give it as path:{source.path}#"
                    f"<narHash> (nix hash path --type sha256 --sri {source.path})"
                )
            paths.setdefault(source.path, source)
        policy = SourcePolicy.configure(allowed, [parsed_default, *paths.values()])
        return cls(parsed_default, tuple(paths.values()), follow_min_interval, policy)

    def resolve(self, requested: Mapping[str, Any] | str | None) -> Source:
        """The source a builder uses for ``spec.packageSource`` (None: the default)."""
        source = (
            self.default
            if requested is None
            else sources.parse_source(
                dict(requested) if isinstance(requested, Mapping) else requested
            )
        )
        if isinstance(source, PathSource):
            source = self._known_path(source)  # only the paths it offers: its own policy
        # The builder gets the source as text (--package-source); a source whose text form
        # reads back differently (a git rev *and* ref) would build under another key.
        if sources.parse_source(str(source)) != source:
            raise InvalidInput(
                f"package source {source} is ambiguous on the builder's command line: "
                "give a git rev or a ref, not both"
            )
        if requested is not None and self.policy is not None:
            self.policy.check(source)
        return source

    def _known_path(self, source: PathSource) -> PathSource:
        known = next((p for p in self.paths if p.path == source.path), None)
        if known is None:
            offered = ", ".join(p.path for p in self.paths) or "none"
            raise InvalidInput(
                f"package source path {source.path} is not available to builders "
                f"(the operator offers: {offered})"
            )
        if source.narHash is not None and source.narHash != known.narHash:
            raise InvalidInput(
                f"package source {source} does not match the builders' copy of {source.path} "
                f"({known.narHash})"
            )
        return known


@dataclass(frozen=True)
class Target:
    """One NixImage's wish, resolved: what to build, under which key, where to tag it."""

    namespace: str
    name: str
    uid: str
    generation: int
    spec: imagespec.BuildTarget
    """One image, or an index of one image per architecture."""
    key: str
    tag: str
    follow: Follow | None = None
    """``spec.follow`` when it is on."""
    revision: str | None = None
    """The commit the followed reference resolved to (``status.follow.revision``), which
    ``spec.source`` is pinned to."""

    @property
    def repository(self) -> str:
        """``<namespace>/<name>``: the registry name, and the tag path in storage."""
        return f"{self.namespace}/{self.name}"

    @property
    def architectures(self) -> tuple[str, ...]:
        """The image's architectures: one, or an index's, in the spec's order."""
        if isinstance(self.spec, imagespec.IndexSpec):
            return self.spec.architectures
        return (self.spec.arch,)

    @property
    def pinned(self) -> bool:
        """Only a pinned source makes a stored result reusable
        (docs/architecture.md#identity-and-caching)."""
        return self.spec.source.pinned


def resolve(body: Mapping[str, Any], package_sources: PackageSources) -> Target:
    """Parse a NixImage body; raises ``InvalidInput`` saying what is wrong with the spec."""
    metadata = body.get("metadata") or {}
    image = resource.parse_resource(
        {key: body.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
    )
    if not image.metadata.namespace:
        raise InvalidInput("a NixImage in a cluster must have a namespace")
    try:
        source = package_sources.resolve(image.spec.packageSource)
    except InvalidInput as exc:  # the same kind (SourceNotAllowed is its own reason)
        raise type(exc)(f"spec.packageSource: {exc}") from exc
    follow = image.spec.follow
    revision = _followed_revision(body, source)
    if follow is not None and follow.enabled:
        tracking.check(follow, source, package_sources.follow_min_interval)
        if revision is None:
            raise AwaitingRevision(f"resolving {source} for the first time")
    if follow is not None and revision is not None and tracking.moving_reference(source):
        # Off, the last revision stays: turning following off does not rebuild.
        source = tracking.pinned(source, revision)
    else:
        revision = None
    spec = imagespec.make_target(
        image.spec.packages,
        source,
        architectures=image.spec.platform_architectures,
        format=image.spec.format,
        compression=image.spec.compression,
    )
    # Kubernetes names always fit the registry's grammar; checked anyway, as storage keys.
    reference.check_repository(f"{image.metadata.namespace}/{image.metadata.name}")
    return Target(
        namespace=image.metadata.namespace,
        name=image.metadata.name,
        uid=str(metadata.get("uid") or ""),
        generation=int(metadata.get("generation") or 0),
        spec=spec,
        key=spec.build_key(),
        tag=image.spec.tag,
        follow=follow if follow is not None and follow.enabled else None,
        revision=revision,
    )


class AwaitingRevision(Exception):
    """A followed NixImage whose reference the operator has not resolved yet: nothing to
    build until the follow loop writes ``status.follow.revision``."""


def _followed_revision(body: Mapping[str, Any], source: Source) -> str | None:
    """``status.follow.revision``, if it is a revision of this very source (a changed
    ``spec.packageSource`` must be resolved anew, not built at the old one's commit)."""
    state = ((body.get("status") or {}).get("follow")) or {}
    if not isinstance(state, Mapping) or state.get("source") != str(source):
        return None
    revision = state.get("revision")
    return revision if isinstance(revision, str) and _COMMIT.fullmatch(revision) else None
