"""Referrer links ``referrers/<subject hex>/<referrer hex>``: the artifacts stored about a
manifest (an image's SBOM), each link holding the descriptor the referrers API lists.

The builder writes a link after the artifact's blobs exist; the registry lists one
subject's links to answer ``GET /v2/<name>/referrers/<digest>``; gc keeps an artifact
while its subject is kept (``gc.marking.Marker`` follows the links) and deletes links
whose artifact is gone. Imports digest, errors and storage's interface only.
"""

from __future__ import annotations

import json
from typing import Any

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_core.imagespec import canonical_json
from niximage_core.storage.base import Storage, check_key

REFERRERS_ROOT = "referrers/"


def link_prefix(subject: Digest) -> str:
    return f"{REFERRERS_ROOT}{subject.hex}/"


def link_path(subject: Digest, referrer: Digest) -> str:
    return check_key(link_prefix(subject) + referrer.hex)


def parse_link(key: str) -> tuple[Digest, Digest] | None:
    """(subject, referrer) a link's key names, or None for a key that is no link."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] + "/" != REFERRERS_ROOT:
        return None
    try:
        return Digest(parts[1]), Digest(parts[2])
    except InvalidInput:
        return None


def record(storage: Storage, subject: Digest, descriptor: dict[str, Any]) -> None:
    """Link ``subject`` to the artifact ``descriptor`` names (whose blobs must exist)."""
    referrer = Digest.parse(str(descriptor["digest"]))
    path = link_path(subject, referrer)
    data = canonical_json(descriptor)
    if storage.read(path) != data:
        storage.write(path, data)


def listed(storage: Storage, subject: Digest) -> list[dict[str, Any]]:
    """The descriptors of ``subject``'s referrers (links that do not parse are skipped:
    they are reported by nothing and deleted by gc once their artifact is gone)."""
    found = []
    for key in storage.list(link_prefix(subject)):
        raw = storage.read(key)
        parsed = parse_link(key)
        if raw is None or parsed is None:
            continue
        try:
            descriptor = json.loads(raw)
            matches = isinstance(descriptor, dict) and descriptor.get("digest") == str(parsed[1])
        except ValueError:
            continue
        if matches:
            found.append(descriptor)
    return found


def all_links(storage: Storage) -> dict[Digest, list[Digest]]:
    """Every subject's referrers, from one listing (gc's marking)."""
    links: dict[Digest, list[Digest]] = {}
    for key in storage.list(REFERRERS_ROOT):
        parsed = parse_link(key)
        if parsed is not None:
            links.setdefault(parsed[0], []).append(parsed[1])
    return links
