"""The image spec and its build key (docs/architecture.md#identity-and-caching). Pure; imports
names, sources, errors.

The spec is everything that determines an image: normalised packages, architecture,
package source and output format. The build key is a sha256 over a canonical JSON
encoding of it plus ``FORMAT_VERSION``: JSON lists cannot be confused the way joined
strings can (Nixery hashes ``"ab"+"c"`` and ``"a"+"bc"`` alike), and the architecture
and source are part of it (Nixery leaves the architecture out).

An image of several platforms is an ``IndexSpec``: one ``ImageSpec`` per architecture,
built and cached each on its own, and an image index over them. Its key is made of the
platforms' keys, so adding arm64 to an amd64 image reuses the amd64 build.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from niximage_core import names
from niximage_core.errors import InvalidInput
from niximage_core.sources import PackageSource

FORMAT_VERSION = 2
"""Bump when the builder's output for the same spec changes (layering, tar, manifest).
2: layers compressed in chunks of 4 MiB of tar (``niximage_builder.compression``), and
over the layer budget the small paths spread over up to 24 layers (``layering``)."""

Arch = Literal["amd64", "arm64"]
ManifestFormat = Literal["oci", "docker"]
Compression = Literal["gzip", "zstd"]


def canonical_json(value: Any) -> bytes:
    """One byte string per value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class ImageSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    packages: tuple[str, ...]
    """Normalised: valid, ``cacert``/``iana-etc`` added, de-duplicated, sorted."""
    arch: Arch = "amd64"
    source: PackageSource
    format: ManifestFormat = "oci"
    compression: Compression = "gzip"

    @field_validator("packages", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ValueError("packages must be a list of package names")
        return names.normalise_packages(value)

    @model_validator(mode="after")
    def _layer_type_exists(self) -> ImageSpec:
        if self.format == "docker" and self.compression == "zstd":
            # Docker schema2 defines gzip layers only (manifest.LAYER_TYPES).
            raise ValueError("format docker has no zstd layers: use format oci, or gzip")
        return self

    @property
    def system(self) -> str:
        """The Nix system string of the architecture."""
        return names.ARCHITECTURES[self.arch]

    @property
    def has_shell(self) -> bool:
        return "bashInteractive" in self.packages or "bash" in self.packages

    def key_material(self) -> dict[str, Any]:
        return {
            "formatVersion": FORMAT_VERSION,
            "packages": list(self.packages),
            "arch": self.arch,
            "source": self.source.model_dump(mode="json"),
            "format": self.format,
            "compression": self.compression,
        }

    def build_key(self) -> str:
        """sha256 hex of the canonical encoding; equal specs, equal keys, in any process."""
        return hashlib.sha256(canonical_json(self.key_material())).hexdigest()


def make_spec(
    packages: list[str] | tuple[str, ...],
    source: Any,
    arch: str = "amd64",
    format: str = "oci",
    compression: str = "gzip",
) -> ImageSpec:
    """Build a spec, turning pydantic's errors into one ``InvalidInput`` message."""
    # Check names one by one first so the message names the offending package.
    for name in packages:
        names.check_package_name(name)
    try:
        return ImageSpec(
            packages=tuple(packages),
            source=source,
            arch=arch,
            format=format,
            compression=compression,
        )
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(part) for part in err["loc"]) + (": " if err["loc"] else "")
            + err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )  # fmt: skip
        raise InvalidInput(f"invalid image spec: {problems}") from exc
    except ValueError as exc:
        raise InvalidInput(f"invalid image spec: {exc}") from exc


class IndexSpec(BaseModel):
    """The same packages for several architectures: an image index over one image each."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    images: tuple[ImageSpec, ...]
    """One per architecture, in the order asked; the same in all but ``arch``."""

    @model_validator(mode="after")
    def _one_image_of_several_platforms(self) -> IndexSpec:
        arches = [image.arch for image in self.images]
        if len(arches) < 2:
            raise ValueError("an image index needs two architectures or more")
        if len(set(arches)) != len(arches):
            raise ValueError(f"architectures must not repeat: {', '.join(arches)}")
        first = self.images[0].model_dump(exclude={"arch"})
        if any(image.model_dump(exclude={"arch"}) != first for image in self.images[1:]):
            raise ValueError("the platforms of an index differ only in their architecture")
        return self

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(image.arch for image in self.images)

    @property
    def packages(self) -> tuple[str, ...]:
        return self.images[0].packages

    @property
    def source(self) -> PackageSource:
        return self.images[0].source

    @property
    def format(self) -> ManifestFormat:
        return self.images[0].format

    @property
    def compression(self) -> Compression:
        return self.images[0].compression

    def key_material(self) -> dict[str, Any]:
        return {
            "formatVersion": FORMAT_VERSION,
            "index": [image.build_key() for image in self.images],
        }

    def build_key(self) -> str:
        return hashlib.sha256(canonical_json(self.key_material())).hexdigest()


BuildTarget = ImageSpec | IndexSpec
"""What one build makes: one image, or an index of images."""


def spec_document(target: BuildTarget) -> dict[str, Any]:
    """The spec as a build result records it: an image's fields; for an index, the fields
    its platforms share and ``architectures``."""
    if isinstance(target, ImageSpec):
        return target.model_dump(mode="json")
    shared = target.images[0].model_dump(mode="json", exclude={"arch"})
    return {**shared, "architectures": list(target.architectures)}


def make_target(
    packages: list[str] | tuple[str, ...],
    source: Any,
    architectures: list[str] | tuple[str, ...] = ("amd64",),
    format: str = "oci",
    compression: str = "gzip",
) -> BuildTarget:
    """One architecture: an ``ImageSpec`` as ``make_spec`` makes it; several: an
    ``IndexSpec`` of one such spec each (architectures in the order given, no repeats)."""
    if not architectures:
        raise InvalidInput("invalid image spec: architectures: give one architecture or more")
    images = tuple(
        make_spec(packages, source, arch=arch, format=format, compression=compression)
        for arch in architectures
    )
    if len(images) == 1:
        return images[0]
    try:
        return IndexSpec(images=images)
    except ValidationError as exc:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in exc.errors())
        raise InvalidInput(f"invalid image spec: {problems}") from exc
