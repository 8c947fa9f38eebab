"""``niximage export``: copy an image (or an image index with every platform's image) from
storage into an OCI image layout directory.

Imports manifest, reference, digest and the storage interface. Every blob is re-hashed as
it is copied, so a corrupted store is caught here rather than by the client.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from niximage_core import inspection, manifest
from niximage_core.digest import Digest
from niximage_core.errors import StorageError
from niximage_core.reference import ImageRef
from niximage_core.storage.base import Storage, iter_chunks

LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


def export_layout(storage: Storage, ref: ImageRef, directory: Path) -> Digest:
    """Write (or add to) an OCI layout; the image is named by its tag in index.json."""
    digest = inspection.resolve(storage, ref)
    (directory / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    media_type, size = _copy_manifest(storage, digest, directory, nested=False)
    (directory / "oci-layout").write_text(json.dumps(LAYOUT_VERSION))
    _add_to_index(directory, digest, media_type, size, ref.tag or "latest")
    return digest


def _copy_manifest(
    storage: Storage, digest: Digest, directory: Path, nested: bool
) -> tuple[str, int]:
    """Copy a manifest and what it names (an index: each platform's manifest and its
    blobs); its media type and size."""
    manifest_bytes = _read_small(storage, digest)
    media_type = manifest.media_type_of(manifest_bytes)
    if media_type is None:
        raise StorageError(f"{digest} is not an image manifest")
    document = json.loads(manifest_bytes)
    if media_type in (manifest.OCI_INDEX, manifest.DOCKER_LIST):
        if nested:
            raise StorageError(f"{digest}: an index inside an index is not exported")
        for child in document["manifests"]:
            _copy_manifest(storage, Digest.parse(child["digest"]), directory, nested=True)
    else:
        blobs = [Digest.parse(document["config"]["digest"])]
        blobs += [Digest.parse(layer["digest"]) for layer in document["layers"]]
        for blob in blobs:
            _copy_blob(storage, blob, directory)
    _copy_blob(storage, digest, directory)
    return media_type, len(manifest_bytes)


def _read_small(storage: Storage, digest: Digest) -> bytes:
    with storage.open_blob(digest) as stream:
        data = stream.read()
    if Digest.of(data) != digest:
        raise StorageError(f"blob {digest} in {storage.url} does not match its digest")
    return data


def _copy_blob(storage: Storage, digest: Digest, directory: Path) -> None:
    target = directory / "blobs" / "sha256" / digest.hex
    if target.exists():
        return
    partial = target.with_name(f".{digest.hex}.partial")
    hasher = hashlib.sha256()
    with storage.open_blob(digest) as source, open(partial, "wb") as out:
        for chunk in iter_chunks(source):
            hasher.update(chunk)
            out.write(chunk)
    if hasher.hexdigest() != digest.hex:
        partial.unlink()
        raise StorageError(f"blob {digest} in {storage.url} does not match its digest")
    os.replace(partial, target)


def _add_to_index(directory: Path, digest: Digest, media_type: str, size: int, name: str) -> None:
    index_file = directory / "index.json"
    index = (
        json.loads(index_file.read_text())
        if index_file.exists()
        else {"schemaVersion": 2, "mediaType": manifest.OCI_INDEX, "manifests": []}
    )
    annotation = "org.opencontainers.image.ref.name"
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(annotation) != name
    ]
    index["manifests"].append(
        {
            "mediaType": media_type,
            "digest": str(digest),
            "size": size,
            "annotations": {annotation: name},
        }
    )
    index_file.write_text(json.dumps(index, indent=2))
