"""An image's closure and where its files come from: Nix realises it here, or (with binary
caches configured) the caches' narinfo describe it and their NARs supply what is new.

With caches, nothing is downloaded to learn the closure: evaluation gives the requested
packages' store paths, this machine's store is asked which it holds, the caches' signed
narinfo give the references and sizes of the rest, and the layer plan follows. A layer
whose key storage holds is then never fetched; a new one is packed from its NARs
(``contents.CacheContents``). Only a package whose closure some path of no cache belongs
to is left to Nix (substituting from the same caches, building the rest from source).

Imports nixcli, closure, contents and binarycache: the one place that decides between them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from niximage_builder import nixcli
from niximage_builder.closure import ClosureGraph, StorePath
from niximage_builder.contents import CacheContents, Contents, Downloads, LocalStore
from niximage_core.imagespec import ImageSpec

if TYPE_CHECKING:  # binarycache (HTTP, signatures) is imported only when caches are used
    from niximage_builder.binarycache.closure import CacheClosure, Substitutable


@dataclass(frozen=True)
class Obtained:
    graph: ClosureGraph
    contents: Contents
    timings: dict[str, float]
    derivations_built: int
    downloads: Downloads | None
    """What came from the caches' NARs (None without caches); filled in while packing."""
    meta: tuple[dict[str, Any], ...] = ()
    """The requested packages' versions and ``meta`` (``nixcli.package_meta``)."""


@contextlib.contextmanager
def obtain(
    spec: ImageSpec,
    settings: nixcli.NixSettings,
    cancel: threading.Event | None = None,
    spool_dir: str | None = None,
) -> Iterator[Obtained]:
    """The closure of ``spec`` and its contents, for the length of the block (spooled
    NARs are removed at its end)."""
    if not settings.substituters:
        realised = nixcli.realise(spec, settings, cancel)
        yield Obtained(
            realised.graph,
            LocalStore(),
            realised.timings,
            realised.derivations_built,
            None,
            realised.meta,
        )
        return
    from niximage_builder.binarycache.closure import query_closure
    from niximage_builder.binarycache.fetch import BinaryCache
    from niximage_builder.binarycache.narinfo import TrustedKeys

    keys = TrustedKeys.parse(settings.trusted_public_keys)
    caches = [BinaryCache(url, settings.netrc_file) for url in settings.substituters]
    started = time.monotonic()
    evaluation = nixcli.evaluate(spec, settings, cancel)
    outputs = evaluation.outputs
    evaluated = time.monotonic()
    roots = sorted({o.path for o in outputs})
    absent = nixcli.invalid_paths(roots, settings, cancel)
    known = query_closure(absent, caches, keys)
    gaps = nixcli.invalid_paths(sorted(known.missing), settings, cancel)
    for_nix = [o for o in outputs if o.path in absent and _reaches(o.path, known, gaps)]
    built = nixcli.realise_outputs(for_nix, spec.system, settings, cancel)
    realised = time.monotonic()
    local_roots = ({*roots} - absent) | {o.path for o in for_nix}
    local_paths = tuple(sorted(local_roots | (known.missing - gaps)))
    local = nixcli.closure_graph(local_paths, settings, cancel) if local_paths else None
    graph, remote = _merge(roots, local, known)
    timings = {
        "evaluate": evaluated - started,
        "nixBuild": realised - evaluated,
        "closure": time.monotonic() - realised,
    }
    with CacheContents(remote, LocalStore(), spool_dir) as contents:
        yield Obtained(graph, contents, timings, built, contents.downloads, evaluation.meta)


def _reaches(root: str, known: CacheClosure, gaps: set[str]) -> bool:
    """Whether ``root``'s closure, as far as the caches know it, has a path that neither a
    cache nor this store holds (so Nix must make the root)."""
    seen: set[str] = set()
    stack = [root]
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        if path in gaps:
            return True
        if path in known.found:
            stack.extend(known.found[path].info.references)
    return False


def _merge(
    roots: list[str], local: ClosureGraph | None, known: CacheClosure
) -> tuple[ClosureGraph, dict[str, Substitutable]]:
    """This store's closure of what it holds and the caches' of the rest; and the paths
    that come from a cache."""
    nodes: dict[str, StorePath] = dict(local.nodes) if local else {}
    remote: dict[str, Substitutable] = {}
    stack = [root for root in roots if root not in nodes]
    while stack:
        path = stack.pop()
        if path in nodes:
            continue
        remote[path] = known.found[path]
        info = remote[path].info
        refs = tuple(ref for ref in info.references if ref != path)
        nodes[path] = StorePath(path, refs, info.nar_size, f"sha256:{info.nar_hash.hex()}")
        stack.extend(refs)
    return ClosureGraph(tuple(roots), nodes), remote
