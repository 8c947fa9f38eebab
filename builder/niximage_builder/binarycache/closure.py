"""The closure of store paths as the binary caches know it: narinfo for every path, read in
parallel before any NAR is fetched, so the layer plan (references, sizes) is known first.

Imports narinfo and fetch. Each path is asked of the caches in priority order; the first
that has it must have signed it with a trusted key (else ``UntrustedPath``: never a silent
fall-through to a cache that might serve other bytes). Paths no cache has are reported, for
Nix to build.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from niximage_builder.binarycache.fetch import BinaryCache
from niximage_builder.binarycache.narinfo import NarInfo, TrustedKeys

QUERY_THREADS = 16
"""narinfo requests in flight: latency-bound, tiny answers (Nix asks 25 at once)."""


@dataclass(frozen=True)
class Substitutable:
    cache: BinaryCache
    info: NarInfo


@dataclass(frozen=True)
class CacheClosure:
    found: dict[str, Substitutable]
    """Every path of the closure that a cache has, with its verified narinfo."""
    missing: frozenset[str]
    """Paths of the closure no cache has (their references are unknown)."""


def query_closure(
    roots: Iterable[str], caches: Sequence[BinaryCache], keys: TrustedKeys
) -> CacheClosure:
    """Walk the references from ``roots`` through the caches' narinfo."""
    ordered = sorted(caches, key=lambda cache: cache.priority)
    found: dict[str, Substitutable] = {}
    missing: set[str] = set()
    frontier = sorted(set(roots))
    with ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="niximage-narinfo") as pool:
        while frontier:
            answers = list(pool.map(lambda path: _lookup(path, ordered, keys), frontier))
            seen = set(found) | missing
            following: set[str] = set()
            for path, answer in zip(frontier, answers, strict=True):
                if answer is None:
                    missing.add(path)
                    continue
                found[path] = answer
                following.update(answer.info.references)
            frontier = sorted(following - seen - set(frontier))
    return CacheClosure(found, frozenset(missing))


def _lookup(path: str, caches: Sequence[BinaryCache], keys: TrustedKeys) -> Substitutable | None:
    for cache in caches:
        info = cache.narinfo(path)
        if info is not None:
            keys.verify(info, cache.url)
            return Substitutable(cache, info)
    return None
