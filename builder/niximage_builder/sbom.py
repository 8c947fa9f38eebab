"""An image's bill of materials: a CycloneDX document of its Nix closure. Pure.

Nix knows the exact closure, so the document is complete by construction, not a scanner's
guess: one component per store path (name and version from the store path's name, as
``builtins.parseDrvName`` splits it; the NAR's sha256; its NAR size and store path as
properties), licence, homepage and description where the requested packages' ``meta``
gives them (``nixcli.package_meta``), and the dependency graph from the store references.
The image itself is the document's subject component, depending on the requested packages.

The bytes are canonical JSON and carry no clock or random serial: the same closure gives
the same document and digest on every machine, like the image. cyclonedx-python-lib
builds and serialises the document; ``niximage_core.closurediff`` reads it back.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.tool import ToolRepository
from cyclonedx.output.json import JsonV1Dot6

from niximage_builder.binarycache.nixbase32 import parse_sha256
from niximage_builder.closure import ClosureGraph, StorePath
from niximage_core import __version__
from niximage_core.closurediff import PROPERTY_NAR_SIZE, PROPERTY_STORE_PATH, SBOM_TYPE
from niximage_core.digest import Digest
from niximage_core.imagespec import ImageSpec, canonical_json

MEDIA_TYPE = SBOM_TYPE
"""CycloneDX JSON: the SBOM blob's media type and its artifact's ``artifactType``."""
TITLE = "sbom.cdx.json"
IMAGE_REF = "image"
"""The ``bom-ref`` of the image, the document's subject component."""
_EPOCH = datetime.datetime(1970, 1, 1, 0, 0, 1, tzinfo=datetime.UTC)
"""The image's own ``created`` (manifest.CREATED): no build clock in the bytes."""
_SERIALS = uuid.UUID("5b0c7d3e-6a51-4c57-9a55-6e6978696d67")
"""Namespace of the serial numbers: uuid5 of the image manifest's digest."""


def split_name(name: str) -> tuple[str, str]:
    """``jq-1.6`` → (``jq``, ``1.6``): Nix's ``parseDrvName``, where the version starts
    after the first ``-`` that is not followed by a letter (``python3.11-six-1.16.0`` →
    ``python3.11-six``, ``1.16.0``; ``glibc`` → ``glibc``, "")."""
    for index, char in enumerate(name):
        if char == "-" and index + 1 < len(name) and not name[index + 1].isalpha():
            return name[:index], name[index + 1 :]
    return name, ""


def document(
    spec: ImageSpec,
    graph: ClosureGraph,
    meta: Sequence[Mapping[str, Any]],
    subject: Digest,
) -> bytes:
    """The CycloneDX 1.6 JSON document of the image ``subject`` (its manifest's digest)."""
    described = {str(m.get("path")): m for m in meta if isinstance(m, Mapping)}
    roots = set(graph.roots)
    components = {
        path: _component(node, path in roots, described.get(path, {}))
        for path, node in sorted(graph.nodes.items())
    }
    image = Component(
        type=ComponentType.CONTAINER,
        name="/".join(spec.packages),
        bom_ref=IMAGE_REF,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=subject.hex)],
        properties=[
            Property(name="niximage:architecture", value=spec.arch),
            Property(name="niximage:packageSource", value=str(spec.source)),
        ],
    )
    tool = Component(type=ComponentType.APPLICATION, name="niximage", version=__version__)
    bom = Bom(
        serial_number=uuid.uuid5(_SERIALS, str(subject)),
        metadata=BomMetaData(
            timestamp=_EPOCH, component=image, tools=ToolRepository(components=[tool])
        ),
    )
    for component in components.values():
        bom.components.add(component)
    bom.register_dependency(image, [components[root] for root in sorted(roots)])
    for path, node in sorted(graph.nodes.items()):
        bom.register_dependency(components[path], [components[ref] for ref in node.references])
    # The library's own key order is its business; ours is canonical.
    return canonical_json(json.loads(JsonV1Dot6(bom).output_as_string(indent=None)))


def _component(node: StorePath, requested: bool, meta: Mapping[str, Any]) -> Component:
    name, version = split_name(node.name)
    if isinstance(meta.get("pname"), str) and meta["pname"]:
        name = meta["pname"]
    if isinstance(meta.get("version"), str) and meta["version"]:
        version = meta["version"]
    hashes = []
    if node.nar_hash:
        hashes = [HashType(alg=HashAlgorithm.SHA_256, content=parse_sha256(node.nar_hash).hex())]
    licenses = [
        LicenseFactory().make_from_string(text)
        for text in meta.get("licenses") or ()
        if isinstance(text, str) and text
    ]
    homepage = meta.get("homepage")
    references = []
    if isinstance(homepage, str) and homepage.startswith(("https://", "http://")):
        references = [ExternalReference(type=ExternalReferenceType.WEBSITE, url=XsUri(homepage))]
    description = meta.get("description")
    return Component(
        type=ComponentType.APPLICATION if requested else ComponentType.LIBRARY,
        name=name,
        version=version or None,
        bom_ref=node.path,
        description=description if isinstance(description, str) else None,
        hashes=hashes,
        licenses=licenses,
        external_references=references,
        properties=[
            Property(name=PROPERTY_STORE_PATH, value=node.path),
            Property(name=PROPERTY_NAR_SIZE, value=str(node.nar_size)),
        ],
    )
