"""The NixImage resource as a user writes it (``kubectl apply -f``), parsed with pydantic.

Pure; imports imagespec, sources, names, reference, units. The CLI's ``build -f`` and the
operator read the same file the same way, so a manifest that builds locally builds in
the cluster.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from niximage_core import imagespec, names, reference, sources, units
from niximage_core.errors import InvalidInput

API_VERSION = "niximage.dev/v1alpha1"
KIND = "NixImage"
HISTORY_LIMIT_MAX = 100


class Follow(BaseModel):
    """Follow the package source's moving reference (a git branch or ref, a nixpkgs
    channel): the operator resolves it to a commit every ``interval``, builds that commit
    when it moved, and moves the tag once the build succeeds."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    enabled: bool = True
    """The switch: false keeps the last revision (and the field's settings)."""
    interval: str = "1h"
    historyLimit: int = Field(default=10, ge=1, le=HISTORY_LIMIT_MAX)
    """Revisions kept in ``status.history``."""

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        try:
            seconds = units.parse_duration(value)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        if seconds <= 0:
            raise ValueError("the interval must be positive")
        return value

    @property
    def interval_seconds(self) -> float:
        return units.parse_duration(self.interval)


class NixImageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    packages: list[str] = Field(min_length=1)
    arch: imagespec.Arch = "amd64"
    architectures: list[imagespec.Arch] | None = Field(default=None, min_length=1)
    """Several: one image index of one image per architecture (``arch`` is then not given)."""
    tag: str = "latest"
    packageSource: dict[str, Any] | None = None
    """The CRD's object form only ({type: nixpkgs, channel: …}): a file that builds here
    must also be accepted by the API server. The text form is for ``--package-source``."""
    format: imagespec.ManifestFormat = "oci"
    compression: imagespec.Compression = "gzip"
    follow: Follow | None = None

    @field_validator("packages")
    @classmethod
    def _packages(cls, value: list[str]) -> list[str]:
        for name in value:
            names.check_package_name(name)
        if len(set(value)) != len(value):
            raise ValueError("packages must not repeat")
        return value

    @field_validator("architectures")
    @classmethod
    def _architectures(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("architectures must not repeat")
        return value

    @model_validator(mode="after")
    def _arch_or_architectures(self) -> NixImageSpec:
        if self.architectures is not None and "arch" in self.model_fields_set:
            raise ValueError("give arch or architectures, not both")
        return self

    @property
    def platform_architectures(self) -> list[str]:
        """The architectures to build, in order: ``architectures``, else ``[arch]``."""
        return list(self.architectures or [self.arch])

    @field_validator("packageSource", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                f"packageSource is an object, e.g. {{type: nixpkgs, channel: nixos-24.05}}, "
                f"not {value[:80]!r} (the text form is for --package-source)"
            )
        return value

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        return reference.check_tag(value)


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow", defer_build=True)

    name: str
    namespace: str | None = None


class NixImage(BaseModel):
    model_config = ConfigDict(extra="allow", defer_build=True)

    apiVersion: Literal["niximage.dev/v1alpha1"]
    kind: Literal["NixImage"]
    metadata: Metadata
    spec: NixImageSpec

    def image_spec(self, default_source: str) -> imagespec.ImageSpec:
        source = sources.parse_source(self.spec.packageSource or default_source)
        return imagespec.make_spec(
            self.spec.packages,
            source,
            arch=self.spec.arch,
            format=self.spec.format,
            compression=self.spec.compression,
        )

    def target(self, default_source: str) -> imagespec.BuildTarget:
        """What to build: one image, or an index of one image per architecture."""
        source = sources.parse_source(self.spec.packageSource or default_source)
        return imagespec.make_target(
            self.spec.packages,
            source,
            architectures=self.spec.platform_architectures,
            format=self.spec.format,
            compression=self.spec.compression,
        )

    @property
    def repository(self) -> str:
        """``<namespace>/<name>`` in a cluster; ``<name>`` for a file with no namespace."""
        parts = [p for p in (self.metadata.namespace, self.metadata.name) if p]
        return reference.check_repository("/".join(parts))


def parse_resource(data: Any) -> NixImage:
    try:
        return NixImage.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInput(f"invalid NixImage: {problems}") from exc
    except InvalidInput as exc:
        raise InvalidInput(f"invalid NixImage: {exc}") from exc


def load_file(path: str) -> NixImage:
    import yaml  # only for -f: a build from the command line never reads YAML

    try:
        with open(path) as stream:
            documents = [d for d in yaml.safe_load_all(stream) if d is not None]
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path} is not valid YAML: {exc}") from exc
    images = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(images) != 1:
        raise InvalidInput(f"{path} must hold exactly one NixImage, found {len(images)}")
    return parse_resource(images[0])
