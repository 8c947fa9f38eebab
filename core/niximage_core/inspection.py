"""What storage holds about one image: its manifest (an index's platform image), its SBOM,
and the closure diff of two images. ``niximage sbom`` and ``niximage diff`` print these;
the operator summarises a rebuild with ``diff_images``.

Imports closurediff, digest, errors, layout, manifest, reference, referrers and storage's
interface. Every blob read is checked against its digest.
"""

from __future__ import annotations

import json
from typing import Any

from niximage_core import closurediff, layout, manifest, referrers
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NixImageError, NotFound, StorageError
from niximage_core.reference import ImageRef
from niximage_core.result import Referrer
from niximage_core.storage.base import Storage

SBOM_TYPE = closurediff.SBOM_TYPE
MAX_DOCUMENT = 64 << 20


def resolve(storage: Storage, ref: ImageRef) -> Digest:
    """The manifest digest ``ref`` names (its tag's, or its own)."""
    if ref.digest is not None:
        return ref.digest
    assert ref.tag is not None
    digest = layout.read_tag(storage, ref.repository, ref.tag, with_pulls=True)
    if digest is None:
        raise NotFound(f"no tag {ref} in {storage.url}")
    return digest


def read_json(storage: Storage, digest: Digest) -> dict[str, Any]:
    """A stored JSON blob (a manifest, an SBOM), verified against its digest."""
    try:
        with storage.open_blob(digest) as stream:
            data = stream.read(MAX_DOCUMENT + 1)
    except NotFound:
        raise NotFound(f"blob {digest} is not in {storage.url}") from None
    if len(data) > MAX_DOCUMENT or Digest.of(data) != digest:
        raise StorageError(f"blob {digest} in {storage.url} does not match its digest")
    try:
        document = json.loads(data)
    except ValueError:
        raise StorageError(f"blob {digest} in {storage.url} is not JSON") from None
    if not isinstance(document, dict):
        raise StorageError(f"blob {digest} in {storage.url} is not a JSON object")
    return document


def platform_image(storage: Storage, digest: Digest, arch: str | None = None) -> Digest:
    """``digest`` itself for an image; for an index, its ``arch`` image (default: the only
    one, else amd64)."""
    document = read_json(storage, digest)
    if document.get("mediaType") not in (manifest.OCI_INDEX, manifest.DOCKER_LIST):
        return digest
    entries = {
        str(entry.get("platform", {}).get("architecture")): str(entry.get("digest"))
        for entry in document.get("manifests") or ()
        if isinstance(entry, dict)
    }
    chosen = arch or (next(iter(entries)) if len(entries) == 1 else "amd64")
    if chosen not in entries:
        raise InvalidInput(
            f"image index {digest} has no {chosen} image (it has {', '.join(sorted(entries))});"
            " choose one with --arch"
        )
    return Digest.parse(entries[chosen])


def stored_sbom(storage: Storage, image: Digest) -> Referrer | None:
    """The SBOM artifact linked to the image (its manifest and blobs, the document last), or
    None when there is none or its artifact manifest is gone or damaged."""
    for descriptor in referrers.listed(storage, image):
        if descriptor.get("artifactType") != SBOM_TYPE:
            continue
        try:
            artifact = read_json(storage, Digest.parse(str(descriptor["digest"])))
            blobs = [artifact["config"]["digest"], *(d["digest"] for d in artifact["layers"])]
            return Referrer(
                artifactType=SBOM_TYPE,
                manifestDigest=str(descriptor["digest"]),
                blobs=[str(Digest.parse(str(d))) for d in blobs],
            )
        except (NixImageError, KeyError, TypeError):
            continue
    return None


def sbom_digest(storage: Storage, image: Digest) -> Digest:
    """The blob of the image's SBOM document, found through its referrers."""
    found = stored_sbom(storage, image)
    if found is None or len(found.blobs) < 2:
        raise NotFound(
            f"image {image} has no SBOM in {storage.url} (built before niximage wrote them: "
            "build it again with --rebuild)"
        )
    return Digest.parse(found.blobs[-1])


def sbom(storage: Storage, image: Digest) -> dict[str, Any]:
    return read_json(storage, sbom_digest(storage, image))


def diff_images(storage: Storage, old: Digest, new: Digest) -> closurediff.ClosureDiff:
    """The closure diff of two (platform) images, with their layers."""
    old_manifest, new_manifest = read_json(storage, old), read_json(storage, new)
    return closurediff.diff(
        sbom(storage, old),
        sbom(storage, new),
        old_manifest.get("layers") or [],
        new_manifest.get("layers") or [],
    )
