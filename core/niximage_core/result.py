"""Build results: what a builder reports (``builds/<key>``, CLI JSON, termination message).

Pure; imports errors. The one contract between builder pod and operator: one writer (the
builder), one reader (the operator). A result is either a success with the manifest
digest and layers, or an error with its kind (the operator's condition reason).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from niximage_core.errors import NixImageError, PackagesNotFound

# Every model here sets ``defer_build``: pydantic builds a model's validator when it is
# first used, so a command pays only for the models it touches (a warm ``niximage build``
# starts in tens of milliseconds).

TERMINATION_LIMIT = 4096
"""Kubernetes truncates a container's termination message at 4 KiB."""


class LayerResult(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    digest: str
    diffId: str
    size: int
    """Compressed bytes."""
    narSize: int
    """Bytes of the store paths (uncompressed contents)."""
    paths: list[str]
    reused: bool
    """True when the layer was already in storage: neither packed nor uploaded."""


class Referrer(BaseModel):
    """An artifact stored about the image (its SBOM): an OCI manifest whose ``subject`` is
    the image manifest, and the blobs it names, so gc and tags keep them with the image."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    artifactType: str
    manifestDigest: str
    blobs: list[str]
    """The artifact's config and documents."""


class PlatformResult(BaseModel):
    """One platform of an image index: its own build (``builds/<buildKey>``) and image."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    architecture: str
    buildKey: str
    manifestDigest: str
    configDigest: str
    imageSize: int
    layers: list[str]
    """The image's layer digests, so the index result names every blob it relies on."""
    referrers: list[Referrer] = Field(default_factory=list)


class BuildError(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    kind: str
    """MissingPackages, InvalidSpec, EvalError, BuildFailed, Timeout, StorageError, ..."""
    message: str
    missingPackages: list[str] = Field(default_factory=list)
    transient: bool = False
    log: str = ""

    @classmethod
    def from_exception(cls, error: NixImageError) -> BuildError:
        return cls(
            kind=error.kind,
            message=str(error),
            missingPackages=error.names if isinstance(error, PackagesNotFound) else [],
            transient=error.transient,
            log=getattr(error, "log", "")[-4000:],
        )


class BuildResult(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    buildKey: str
    spec: dict[str, Any]
    ok: bool
    manifestDigest: str | None = None
    mediaType: str | None = None
    configDigest: str | None = None
    imageSize: int = 0
    """Compressed bytes of config and layers: what a client downloads."""
    layers: list[LayerResult] = Field(default_factory=list)
    bytesUploaded: int = 0
    derivationsBuilt: int = 0
    """Derivations Nix built from source for this build (not substituted from a cache)."""
    narsDownloaded: int = 0
    """Store paths packed straight from a binary cache's NAR (no store write)."""
    narBytesDownloaded: int = 0
    """Their NARs' bytes, uncompressed."""
    bytesDownloaded: int = 0
    """Their bytes as the caches served them (compressed)."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds per phase: nixBuild, closure, layering, packing, manifest, total."""
    referrers: list[Referrer] = Field(default_factory=list)
    """Artifacts about this image: its SBOM (docs/architecture.md#sboms-and-referrers)."""
    platforms: list[PlatformResult] = Field(default_factory=list)
    """For an image index (``manifestDigest`` is the index's): each platform's image."""
    error: BuildError | None = None
    cached: bool = False
    """True when the whole result came from ``builds/<key>`` without building."""

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BuildResult:
        return cls.model_validate_json(data)

    def termination_message(self) -> str:
        """A short summary that fits the 4 KiB termination message, always valid JSON."""
        summary: dict[str, Any] = {"buildKey": self.buildKey, "ok": self.ok}
        if self.ok:
            summary.update(digest=self.manifestDigest, size=self.imageSize, layers=len(self.layers))
            if self.platforms:
                summary["platforms"] = {p.architecture: p.manifestDigest for p in self.platforms}
        elif self.error is not None:
            summary.update(kind=self.error.kind, message=self.error.message[:1000])
            if self.error.transient:
                summary["transient"] = True
            names = list(self.error.missingPackages)
            while (
                names and len(json.dumps({**summary, "missingPackages": names})) > TERMINATION_LIMIT
            ):
                names.pop()
            if names:
                summary["missingPackages"] = names
        text = json.dumps(summary, sort_keys=True)
        return (
            text
            if len(text) <= TERMINATION_LIMIT
            else json.dumps({"buildKey": self.buildKey, "ok": self.ok})
        )
