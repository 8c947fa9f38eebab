"""The roots gc keeps, read in one go (rule G1): tags, successful build results, leases.

Imports digest, errors, result, the storage interface, reading and leases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_core.gc.leases import LeaseRecord, read_leases
from niximage_core.gc.reading import read_all
from niximage_core.result import BuildResult
from niximage_core.storage.base import Storage


@dataclass
class Roots:
    """What references blobs, as read at ``started`` (monotonic)."""

    started: float
    tags: dict[str, Digest]
    builds: dict[str, BuildResult]
    """Successful results, by key."""
    leases: list[LeaseRecord]
    broken_leases: list[str]
    invalid: list[str] = field(default_factory=list)
    """Tags and build results that could not be parsed (kept, reported)."""


def read_roots(storage: Storage) -> Roots:
    started = time.monotonic()
    invalid: list[str] = []
    tags: dict[str, Digest] = {}
    for key, raw in read_all(storage, storage.list("tags/")).items():
        if raw is None:
            continue  # deleted meanwhile
        try:
            tags[key] = Digest.parse(raw.decode().strip())
        except (UnicodeDecodeError, InvalidInput):
            invalid.append(key)
    builds: dict[str, BuildResult] = {}
    for key, raw in read_all(storage, storage.list("builds/")).items():
        if raw is None:
            continue
        try:
            result = BuildResult.from_json(raw)
        except ValueError:
            invalid.append(key)
            continue
        if not result.ok or not result.manifestDigest:
            continue  # failures name no blobs
        try:
            result_digests(result)
        except InvalidInput:
            invalid.append(key)
            continue
        builds[key] = result
    leases, broken = read_leases(storage)
    return Roots(started, tags, builds, leases, broken, invalid)


def result_digests(result: BuildResult) -> list[Digest]:
    """The blobs a successful result names: manifest, config, layers."""
    named = [result.manifestDigest, result.configDigest, *(layer.digest for layer in result.layers)]
    return [Digest.parse(d) for d in named if d]
