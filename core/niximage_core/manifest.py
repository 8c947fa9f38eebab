"""OCI / Docker schema2 image configs and manifests as canonical bytes. Pure.

Imports digest and imagespec. The bytes are canonical JSON (sorted keys, no whitespace), so
the same layers give the same digest in any process; ``created`` is fixed for the same
reason. Docker schema2 has no zstd layer type, so that combination is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_core.imagespec import ImageSpec, canonical_json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG_DATA = b"{}"
"""The OCI 1.1 empty descriptor's blob: the config of an artifact that needs none."""
ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_TITLE = "org.opencontainers.image.title"

LAYER_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
CREATED = "1970-01-01T00:00:01Z"
"""Nix's epoch: every store file has mtime 1, and so does the image."""
PATH_ENV = "PATH=/bin:/usr/bin:/sbin:/usr/sbin"
CERT_ENV = "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
LABEL_PACKAGES = "dev.niximage.packages"
LABEL_SOURCE = "dev.niximage.package-source"


@dataclass(frozen=True)
class LayerDescriptor:
    digest: Digest
    diff_id: Digest
    size: int
    comment: str
    """What the layer holds, for the config's history (``podman history``)."""


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> Digest:
        return Digest.of(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": len(self.data)}


def layer_media_type(spec: ImageSpec) -> str:
    try:
        return LAYER_TYPES[(spec.format, spec.compression)]
    except KeyError:
        raise InvalidInput(
            f"{spec.compression} layers need the oci manifest format, not {spec.format}"
        ) from None


def image_config(
    spec: ImageSpec, layers: Sequence[LayerDescriptor], cmd: Sequence[str] | None
) -> Blob:
    """The image config: platform, diffIDs in manifest order, Env, Cmd, labels."""
    container: dict[str, Any] = {
        "Env": [PATH_ENV, CERT_ENV],
        "Labels": {
            LABEL_PACKAGES: " ".join(spec.packages),
            LABEL_SOURCE: str(spec.source),
        },
    }
    if cmd:
        container["Cmd"] = list(cmd)
    config = {
        "architecture": spec.arch,
        "os": "linux",
        "created": CREATED,
        "config": container,
        "rootfs": {"type": "layers", "diff_ids": [str(layer.diff_id) for layer in layers]},
        "history": [
            {"created": CREATED, "created_by": "niximage", "comment": layer.comment}
            for layer in layers
        ],
    }
    media_type = OCI_CONFIG if spec.format == "oci" else DOCKER_CONFIG
    return Blob(media_type, canonical_json(config))


def image_manifest(spec: ImageSpec, config: Blob, layers: Sequence[LayerDescriptor]) -> Blob:
    layer_type = layer_media_type(spec)
    media_type = OCI_MANIFEST if spec.format == "oci" else DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": [
            {"mediaType": layer_type, "digest": str(layer.digest), "size": layer.size}
            for layer in layers
        ],
    }
    return Blob(media_type, canonical_json(manifest))


PLATFORMS: dict[str, dict[str, str]] = {
    "amd64": {"architecture": "amd64", "os": "linux"},
    # The OCI image index spec's variant for 64-bit ARM; containerd and podman match a
    # plain linux/arm64 request to it.
    "arm64": {"architecture": "arm64", "os": "linux", "variant": "v8"},
}
"""The ``platform`` of each architecture's entry in an image index."""


@dataclass(frozen=True)
class IndexEntry:
    """One platform's image, as an index names it."""

    arch: str
    media_type: str
    digest: Digest
    size: int


def image_index(format: str, entries: Sequence[IndexEntry]) -> Blob:
    """An OCI image index (``format`` oci) or a Docker manifest list (docker) over one image
    per platform, in the order given."""
    media_type = OCI_INDEX if format == "oci" else DOCKER_LIST
    index = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": entry.media_type,
                "digest": str(entry.digest),
                "size": entry.size,
                "platform": PLATFORMS[entry.arch],
            }
            for entry in entries
        ],
    }
    return Blob(media_type, canonical_json(index))


def media_type_of(manifest_bytes: bytes) -> str | None:
    """The ``mediaType`` a stored manifest declares (we always write it), or None."""
    try:
        value = json.loads(manifest_bytes)
    except ValueError:
        return None
    media_type = value.get("mediaType") if isinstance(value, dict) else None
    return media_type if media_type in MANIFEST_TYPES else None


def artifact_manifest(
    artifact_type: str,
    document: Blob,
    title: str,
    subject: Blob,
) -> Blob:
    """An OCI 1.1 artifact: one ``document`` about ``subject`` (an SBOM about an image),
    with the empty config, found through the referrers API. Canonical like every manifest."""
    artifact = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": Blob(OCI_EMPTY, EMPTY_CONFIG_DATA).descriptor(),
        "layers": [{**document.descriptor(), "annotations": {ANNOTATION_TITLE: title}}],
        "subject": subject.descriptor(),
        "annotations": {ANNOTATION_CREATED: CREATED},
    }
    return Blob(OCI_MANIFEST, canonical_json(artifact))


def referrer_descriptor(artifact: Blob) -> dict[str, Any]:
    """How the referrers API lists an artifact: its descriptor with ``artifactType`` and
    the manifest's annotations (OCI distribution spec 1.1)."""
    doc = json.loads(artifact.data)
    descriptor = {**artifact.descriptor(), "artifactType": doc["artifactType"]}
    if doc.get("annotations"):
        descriptor["annotations"] = doc["annotations"]
    return descriptor


def referrers_index(descriptors: Sequence[dict[str, Any]]) -> Blob:
    """The referrers API's answer (and the fallback tag's manifest): an image index of the
    referrers' descriptors, ordered by digest so the same set has the same bytes."""
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": sorted(descriptors, key=lambda d: str(d.get("digest", ""))),
    }
    return Blob(OCI_INDEX, canonical_json(index))
