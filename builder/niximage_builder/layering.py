"""Layering: split a runtime closure into OCI image layers. Pure (only ``layers_command``, the
CLI's entry, reads files); imports closure, errors and popularity.

Worked example. An image asks for A, B, C and D (sizes in brackets; ``G`` is glibc-like and
referred to by 2000 paths of the channel, ``L`` by 12, the others by none)::

    A [5 MB] ──► L [1 MB] ──► G [30 MB]        C [40 kB] ──► G
    B [4 MB] ──► L                             D [20 kB]

1. *Alone.* Every path of 100 kB or more gets a layer of its own: {A} {B} {G} {L}.
2. *Small.* The paths under 100 kB share layers of at least 100 kB, most shared first, cut
   where a path's hash says so (content-defined chunking): {C,D}, 60 kB, is one.
3. *Budget.* While there are more layers than the budget, the smallest path that is alone
   joins the small layers. Over the budget the small layers keep a quarter of it (at most
   ``SMALL_SLOTS``, at least one): cut as in step 2 with a minimum size that spreads them over
   those slots, so that a changed path makes a node pull one of many small layers again, not
   one layer of everything small. Budget 4: {G} {A} {B} {C,D,L}. Budget 2: {G} {A,B,C,D,L}.
   Budget 1: one layer.
4. *Order.* Most shared first, by Nixery's rating, popularity × size (Nixery sums closure
   sizes; here a path's own): G (2000 × 30 MB), L (12 × 1 MB), A (1 × 5 MB), B (1 × 4 MB),
   then the small layers, whose content varies most. Without popularity data, a path's
   popularity is 1 + the number of paths in the image that depend on it.

   Result with the default budget (94): {G} {L} {A} {B} {C,D}.

A second image that asks for B alone gets {G} {L} {B}: layers a node that pulled the first
image already has. Nixery gives it {B,L} {G} (B dominates L once A is absent), and its
first layer matches nothing it built before.

Why. A layer is reused only when another image has a layer with exactly the same paths
(docs/architecture.md#identity-and-caching, layer key), so a path must land in a layer whose
content depends on the path,
not on what else the image holds. Grouping by the image's dominator tree (Nixery) or by a
per-image popularity contest (dockerTools) does the opposite: a library that two requested
packages share is grouped differently in every image that has one, the other, or both. Here a
path worth a layer has one, alone, in every image under the budget; what depends on the image
is confined to the small layers, which are cheap to pull twice, and over the budget they take
the smallest paths, so that the large ones stay alone. ``benchmarks/layering.py`` measured
the alternatives, and each was worse: Nixery's dominator groups (2.18× the ideal bytes on the
small request set; 1.00× here); grouping a path with its referrer when popcount's missing
entry says it has only one in the channel (no gain, and with a popularity file from another
channel every missing entry looked exclusive, which made it Nixery-like: up to 12×); one
small layer instead of chunks; more small layers split by popularity tier or hash bucket
(they spend layers the large paths need); choosing what joins the small layers by
popularity × size instead of size; and putting the small layers among the others by rating.

Constants. ``SMALL_LAYER`` (100 kB): one bandwidth-delay product of a pull (100 Mbit/s × 8 ms
round trip = 100 kB). A layer costs a manifest entry, a blob request (two round trips with a
redirect to signed storage), a snapshot and an overlay lower directory whatever its size, so
below this size it costs more to keep a path apart than to pull it twice. NixOS/nix#13155
draws the line at the same 100 kB. The budget (94) is Nixery's: overlay filesystems accept
125 layers, and the rest is left to users who extend the image; the top layer with the
symlink forest comes on top of the budget. A cut probability of 1/2 (step 2) ends a layer
about one path past the minimum and lets the cuts line up again about two paths after a
difference (a greedy fill, probability 1, never lines up again).

Determinism. Sets are never iterated to produce output; every sort breaks ties on path
strings; the chunk cuts use SHA-256, not Python's salted ``hash``; popularity is looked up by
name. The same graph and data give the same layers, in the same order, in any process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from niximage_builder.closure import ClosureGraph, parse_graph
from niximage_builder.popularity import ALWAYS_INCLUDED, Popularity, pname_key, store_name
from niximage_builder.popularity import load as load_popularity
from niximage_core.errors import InvalidInput

SMALL_LAYER = 100_000
"""Bytes; below this a path is not worth a layer of its own (see the module docstring)."""
SMALL_SLOTS = 24
"""Layers the small paths may fill over the budget (a quarter of the budget at most).
``benchmarks/layering_update.py``, 40 images over the budget, 2 % application bump, 10
seeds: one small layer re-pulled a median 1.13× (max 1.83×) the changed bytes; 8 slots
1.17× on seed 17, 16 slots 1.10×, 24 slots 1.09× (median 1.08×, max 1.41×), with the first
pull unchanged (1.02× the ideal bytes)."""
DEFAULT_BUDGET = 94
"""Store-path layers per image (Nixery's budget: 125 overlay layers minus headroom)."""


@dataclass(frozen=True)
class Layer:
    """One image layer: the store paths it holds and the sum of their narSize."""

    paths: tuple[str, ...]
    """Sorted."""
    size: int


def plan_layers(
    graph: ClosureGraph, popularity: Popularity | None = None, budget: int = DEFAULT_BUDGET
) -> list[Layer]:
    """Partition the closure into at most ``budget`` layers, most shared first."""
    if budget < 1:
        raise InvalidInput(f"layer budget must be at least 1, got {budget}")
    if popularity is not None and not popularity.counts:
        popularity = None  # an empty file says nothing
    sizes = {path: node.nar_size for path, node in graph.nodes.items()}
    alone, small = split_small(sizes, budget)
    sharing = sharing_estimates(graph, popularity)
    alone.sort(key=lambda path: (-sharing[path] * sizes[path], path))
    small.sort(key=lambda path: (-sharing[path], path))
    groups = [[path] for path in alone] + chunk_small(small, sizes, budget - len(alone))
    return [Layer(tuple(sorted(group)), sum(sizes[p] for p in group)) for group in groups]


def split_small(sizes: Mapping[str, int], budget: int) -> tuple[list[str], list[str]]:
    """Paths that get a layer of their own, and those that share the small layers.

    Paths under ``SMALL_LAYER`` share; then, while the layers exceed the budget less the
    small layers' slots (one, or over the budget a quarter of it up to ``SMALL_SLOTS``), the
    smallest remaining path joins them. Their content changes from image to image, so they
    should hold as few bytes as possible.
    """
    by_size = sorted(sizes, key=lambda path: (sizes[path], path))
    small = [path for path in by_size if sizes[path] < SMALL_LAYER]
    alone = [path for path in by_size if sizes[path] >= SMALL_LAYER]
    reserve = 1 if small else 0
    if len(alone) + reserve > budget:
        reserve = max(1, min(SMALL_SLOTS, budget // 4))
    while alone and len(alone) + reserve > budget:
        small.append(alone.pop(0))
    return alone, small


def chunk_small(paths: list[str], sizes: Mapping[str, int], slots: int) -> list[list[str]]:
    """Cut the small paths (most shared first) into at most ``slots`` layers of ≥ 100 kB.

    The minimum size is ``SMALL_LAYER``, or half the paths' total per slot when that is
    more (so that the cuts spread the paths over the slots instead of piling the rest into
    the last one). A cut falls after a path once the layer holds the minimum and the path's hash
    is even: cut points belong to paths, not to positions, so a path that one image has and
    another lacks changes only the layer it falls in, and the layers after it line up again
    at the next cut (content-defined chunking). With probability 1/2 per path, a layer ends
    on average one path past the minimum size. Layers beyond the slots, and a last layer
    under the minimum, join the one before (they hold the least shared paths).
    """
    chunks: list[list[str]] = []
    current: list[str] = []
    filled = 0
    minimum = max(SMALL_LAYER, sum(sizes[p] for p in paths) // max(slots, 1) // 2)
    for path in paths:
        current.append(path)
        filled += sizes[path]
        if filled >= minimum and hashlib.sha256(path.encode()).digest()[0] % 2 == 0:
            chunks.append(current)
            current, filled = [], 0
    if current:
        if chunks and filled < minimum:
            chunks[-1].extend(current)
        else:
            chunks.append(current)
    while len(chunks) > max(slots, 1):
        last = chunks.pop()
        chunks[-1].extend(last)
    return chunks


def sharing_estimates(graph: ClosureGraph, popularity: Popularity | None) -> dict[str, int]:
    """Path → how many store paths are likely to share it, for the manifest order.

    With data: its channel-wide popcount. Without: 1 + the paths of this image that depend
    on it, directly or not (measured better than direct referrers only). ``cacert`` and
    ``iana-etc`` are in every image, so they rank above everything either way.
    """
    if popularity is not None:
        return {path: popularity.count_of_path(path) for path in graph.nodes}
    everything = len(graph.nodes) + 1
    counts = {path: 1 + n for path, n in dependent_counts(graph).items()}
    for path in counts:
        if pname_key(store_name(path)) in ALWAYS_INCLUDED:
            counts[path] = everything
    return counts


def dependent_counts(graph: ClosureGraph) -> dict[str, int]:
    """Path → number of other paths in the graph whose closure contains it.

    One pass in topological order (referrers first) with an integer bit set of ancestors
    per path, so it stays fast for closures of thousands of paths.
    """
    referrers = graph.referrers()
    order = topological_order(graph)
    bit = {path: 1 << i for i, path in enumerate(order)}
    ancestors: dict[str, int] = {}
    for path in order:
        mask = 0
        for ref in referrers[path]:
            mask |= ancestors[ref] | bit[ref]
        ancestors[path] = mask
    return {path: mask.bit_count() for path, mask in ancestors.items()}


def topological_order(graph: ClosureGraph) -> list[str]:
    """Every path after all its referrers; ties resolved by path, so always the same."""
    seen: set[str] = set()
    post: list[str] = []
    for start in sorted(graph.nodes):
        if start in seen:
            continue
        seen.add(start)
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            path, i = stack[-1]
            refs = graph.nodes[path].references
            if i < len(refs):
                stack[-1] = (path, i + 1)
                if refs[i] not in seen:
                    seen.add(refs[i])
                    stack.append((refs[i], 0))
            else:
                stack.pop()
                post.append(path)
    return post[::-1]


def layers_to_json(layers: Iterable[Layer]) -> list[dict[str, Any]]:
    """``[{"paths": [...], "size": N}, ...]`` in manifest order (the CLI's output)."""
    return [{"paths": list(layer.paths), "size": layer.size} for layer in layers]


def read_graph(data: Any) -> ClosureGraph:
    """Our graph file, ``niximage plan --json`` output (its ``closure`` and ``roots``), or
    Nix's own ``path-info --json`` output (a list, or an object keyed by path) as is."""
    if isinstance(data, Mapping) and "graph" in data:
        return parse_graph(data)
    if isinstance(data, Mapping) and "closure" in data:
        return parse_graph({"graph": data["closure"], "roots": data.get("roots", ())})
    return parse_graph({"graph": data})


def layers_command(
    graph_file: str, popularity_file: str | None, budget: int = DEFAULT_BUDGET
) -> list[dict[str, Any]]:
    """``niximage layers GRAPH.json [--popularity FILE] [--budget N]``: read, plan, format."""
    try:
        data = json.loads(Path(graph_file).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"closure graph: cannot read {graph_file}: {exc}") from exc
    graph = read_graph(data)
    popularity = load_popularity(popularity_file) if popularity_file is not None else None
    return layers_to_json(plan_layers(graph, popularity, budget))
