"""The two published layering algorithms we measure ours against, re-implemented from their
descriptions (``shared/research/nixery.md`` §3, ``shared/research/peers.md`` §3) for the
benchmark only. Both return layers as sorted path tuples, in manifest order.

- :func:`nixery_layers`: Nixery's dominator-tree grouping with its merge rating (tazjin/nixery
  ``layers/layers.go``). Its unstable ``sort.Slice`` is replaced by a stable sort that breaks
  ties on the paths, so that the baseline itself is deterministic.
- :func:`contest_layers`: nixpkgs ``dockerTools`` popularity contest (``closure-graph.py``)
  followed by ``limit_layers(maxLayers - 1)``: the first ``maxLayers - 2`` paths get a layer
  each, the last store-path layer takes all the rest (one more layer, the customisation layer,
  is not a store-path layer and is not counted, like our top layer).
"""

from __future__ import annotations

from collections.abc import Mapping

from niximage_builder.closure import ClosureGraph
from niximage_builder.layering import closure_sizes, immediate_dominators
from niximage_builder.popularity import store_name

NIXERY_BIG = 100_000_000
NIXERY_POPULAR = 100
NIXERY_HARDCODED = 500_000
_ROOT = ""


def nixery_popularity(name: str, counts: Mapping[str, int] | None) -> int:
    """Nixery's lookup: exact ``name-version``, cacert/iana-etc hard-coded, else 1."""
    if name.startswith(("nss-cacert", "iana-etc")):
        return NIXERY_HARDCODED
    return (counts or {}).get(name, 1)


def nixery_layers(
    graph: ClosureGraph, counts: Mapping[str, int] | None = None, budget: int = 94
) -> list[tuple[str, ...]]:
    """Dominator tree under a root pointing at the requested, big and popular paths."""
    sizes = closure_sizes(graph)
    pop = {p: nixery_popularity(store_name(p), counts) for p in graph.nodes}
    heads = set(graph.roots) | {
        p for p in graph.nodes if sizes[p] > NIXERY_BIG or pop[p] >= NIXERY_POPULAR
    }
    succ: dict[str, tuple[str, ...]] = {_ROOT: tuple(sorted(heads))}
    succ.update({p: node.references for p, node in graph.nodes.items()})
    idom = immediate_dominators(succ, _ROOT)

    top: dict[str, str] = {}

    def top_of(path: str) -> str:
        chain = []
        while path not in top and idom[path] != _ROOT:
            chain.append(path)
            path = idom[path]
        found = top.get(path, path)
        for p in [*chain, path]:
            top[p] = found
        return found

    groups: dict[str, list[str]] = {}
    for path in sorted(graph.nodes):
        groups.setdefault(top_of(path), []).append(path)
    layers = [
        (pop[head] * sum(sizes[p] for p in members), sorted(members))
        for head, members in groups.items()
    ]
    layers.sort(key=lambda rl: (rl[0], rl[1]))
    while len(layers) > budget:
        (r0, m0), (r1, m1) = layers[0], layers[1]
        layers[1:2] = [(r0 + r1, m0 + m1)]
        del layers[0]
    layers.sort(key=lambda rl: (-rl[0], rl[1]))
    return [tuple(sorted(members)) for _, members in layers]


def _package_name(path: str) -> str:
    """closure-graph.py's tie-break: the name with the hash moved to the end."""
    parts = path.split("-")
    return "-".join([*parts[1:], parts[0]])


def contest_popularity(graph: ClosureGraph) -> dict[str, int]:
    """closure-graph.py's score: every reference chain below a path adds to it, weighted by
    the depth at which it meets the path (its own worked example gives F 9, E 5, ...)."""
    referrers = graph.referrers()
    roots = sorted(p for p in graph.nodes if not referrers[p])
    memo: dict[str, dict[str, int]] = {}

    def contest(children: tuple[str, ...]) -> dict[str, int]:
        score: dict[str, int] = {}
        for child in children:
            score[child] = score.get(child, 0) + 1
            if child not in memo:
                memo[child] = contest(graph.nodes[child].references)
            for sub, value in memo[child].items():
                score[sub] = score.get(sub, 0) + value + 1
        return score

    order = sorted(graph.nodes, key=lambda p: len(graph.closure_of([p])))
    for path in order:  # fill the memo bottom-up, so the recursion stays shallow
        memo[path] = contest(graph.nodes[path].references)
    return contest(tuple(roots))


def contest_layers(graph: ClosureGraph, max_layers: int = 100) -> list[tuple[str, ...]]:
    """Popularity contest order; ``max_layers - 2`` single-path layers plus one for the rest."""
    score = contest_popularity(graph)
    ordered = sorted(graph.nodes, key=lambda p: (-score.get(p, 0), _package_name(p)))
    single = max(max_layers - 2, 0)
    layers = [(p,) for p in ordered[:single]]
    if ordered[single:]:
        layers.append(tuple(sorted(ordered[single:])))
    return layers
