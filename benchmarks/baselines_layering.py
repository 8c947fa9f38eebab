"""The published layering algorithms we measure ours against, re-implemented from their
descriptions (Nixery's popcount and dominator-tree grouping, nix2container's and dockerTools'
popularity contest) for the
benchmark only. Each returns layers as sorted path tuples, in manifest order.

- :func:`nixery_layers`: Nixery's dominator-tree grouping with its merge rating (tazjin/nixery
  ``layers/layers.go``). Its unstable ``sort.Slice`` is replaced by a stable sort that breaks
  ties on the paths, so that the baseline itself is deterministic.
- :func:`contest_layers`: nixpkgs ``dockerTools`` popularity contest (``closure-graph.py``)
  followed by ``limit_layers(maxLayers - 1)``: the first ``maxLayers - 2`` paths get a layer
  each and the last store-path layer takes all the rest. The customisation layer, which is
  not a store-path layer, is not counted, like our top layer.
- :func:`auto_layers`: nixpkgs' newer ``auto-layer`` (nixpkgs PR #355189): the largest paths,
  one at a time, become layer roots that take the dependencies used only through them;
  shared dependencies get a layer per set of roots; stops before exceeding the limit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from niximage_builder.closure import ClosureGraph
from niximage_builder.layering import topological_order
from niximage_builder.popularity import store_name

NIXERY_BIG = 100_000_000
NIXERY_POPULAR = 100
NIXERY_HARDCODED = 500_000
_ROOT = ""


def immediate_dominators(succ: Mapping[str, Sequence[str]], start: str) -> dict[str, str]:
    """Cooper, Harvey & Kennedy's iterative algorithm; ``idom[start] == start``."""
    seen = {start}
    post: list[str] = []
    stack: list[tuple[str, int]] = [(start, 0)]
    while stack:
        node, i = stack[-1]
        children = succ.get(node, ())
        if i < len(children):
            stack[-1] = (node, i + 1)
            if children[i] not in seen:
                seen.add(children[i])
                stack.append((children[i], 0))
        else:
            stack.pop()
            post.append(node)
    number = {node: i for i, node in enumerate(post)}
    preds: dict[str, list[str]] = {node: [] for node in post}
    for node in post:
        for child in succ.get(node, ()):
            preds[child].append(node)
    idom = {start: start}
    changed = True
    while changed:
        changed = False
        for node in reversed(post):
            if node == start:
                continue
            new: str | None = None
            for pred in preds[node]:
                if pred not in idom:
                    continue
                if new is None:
                    new = pred
                    continue
                a, b = pred, new
                while a != b:
                    while number[a] < number[b]:
                        a = idom[a]
                    while number[b] < number[a]:
                        b = idom[b]
                new = a
            if new is not None and idom.get(node) != new:
                idom[node] = new
                changed = True
    return idom


def closure_sizes(graph: ClosureGraph) -> dict[str, int]:
    """Path → total narSize of its closure (what Nixery calls a node's size)."""
    order = topological_order(graph)[::-1]  # references first
    bit = {path: 1 << i for i, path in enumerate(order)}
    closure: dict[str, int] = {}
    for path in order:
        mask = bit[path]
        for ref in graph.nodes[path].references:
            mask |= closure[ref]
        closure[path] = mask
    sizes = [graph.nodes[p].nar_size for p in order]
    result = {}
    for path, mask in closure.items():
        total = 0
        while mask:
            low = mask & -mask
            total += sizes[low.bit_length() - 1]
            mask ^= low
        result[path] = total
    return result


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
    succ: dict[str, Sequence[str]] = {_ROOT: tuple(sorted(heads))}
    succ.update({p: node.references for p, node in graph.nodes.items()})
    idom = immediate_dominators(succ, _ROOT)

    def top_of(path: str) -> str:
        while idom[path] != _ROOT:
            path = idom[path]
        return path

    groups: dict[str, list[str]] = {}
    for path in sorted(graph.nodes):
        groups.setdefault(top_of(path), []).append(path)
    layers = [
        (pop[head] * sum(sizes[p] for p in members), members) for head, members in groups.items()
    ]
    layers.sort(key=lambda rated: (rated[0], rated[1]))
    while len(layers) > budget:
        (r0, m0), (r1, m1) = layers[0], layers[1]
        layers[0:2] = [(r0 + r1, m0 + m1)]
    layers.sort(key=lambda rated: (-rated[0], rated[1]))
    return [tuple(sorted(members)) for _, members in layers]


def _package_name(path: str) -> str:
    """closure-graph.py's tie-break: the name with the hash moved to the end."""
    parts = path.split("-")
    return "-".join([*parts[1:], parts[0]])


def contest_popularity(graph: ClosureGraph) -> dict[str, int]:
    """closure-graph.py's score: the closure is unfolded into a tree from the paths nothing
    refers to, and every occurrence of a path adds its depth (its worked example gives F 9)."""
    referrers = graph.referrers()
    memo: dict[str, dict[str, int]] = {}

    def contest(children: Sequence[str]) -> dict[str, int]:
        score: dict[str, int] = {}
        for child in children:
            score[child] = score.get(child, 0) + 1
            for sub, value in memo[child].items():
                score[sub] = score.get(sub, 0) + value + 1
        return score

    for path in topological_order(graph)[::-1]:  # references first
        memo[path] = contest(graph.nodes[path].references)
    return contest(sorted(p for p in graph.nodes if not referrers[p]))


def contest_layers(graph: ClosureGraph, max_layers: int = 100) -> list[tuple[str, ...]]:
    """Popularity contest order; ``max_layers - 2`` single-path layers plus one for the rest."""
    score = contest_popularity(graph)
    ordered = sorted(graph.nodes, key=lambda p: (-score.get(p, 0), _package_name(p)))
    single = max(max_layers - 2, 0)
    layers = [(p,) for p in ordered[:single]]
    if ordered[single:]:
        layers.append(tuple(sorted(ordered[single:])))
    return layers


def auto_layers(graph: ClosureGraph, max_layers: int = 100) -> list[tuple[str, ...]]:
    """nixpkgs auto-layer with ``max_layers - 1`` store-path layers, ordered by closure size."""
    limit = max_layers - 1
    referrers = graph.referrers()

    def reach(start: str, step: Mapping[str, Sequence[str]]) -> set[str]:
        seen: set[str] = set()
        stack = list(step[start])
        while stack:
            p = stack.pop()
            if p not in seen:
                seen.add(p)
                stack.extend(step[p])
        return seen

    refs = {p: n.references for p, n in graph.nodes.items()}
    split: dict[str, frozenset[str]] = {p: frozenset() for p in graph.nodes}
    for primary in sorted(graph.nodes, key=lambda p: (-graph.nodes[p].nar_size, p)):
        new = dict(split)
        new[primary] = frozenset({primary})
        deps, users = reach(primary, refs), reach(primary, referrers)
        for dep in deps:
            new[dep] = new[dep] - users
            if not new[dep] & deps:
                new[dep] = new[dep] | {primary}
        if len(set(new.values())) > limit:
            break
        split = new
    groups: dict[frozenset[str], list[str]] = {}
    for path in sorted(graph.nodes):
        groups.setdefault(split[path], []).append(path)
    members = [tuple(paths) for paths in groups.values()]
    closure_size = {m: sum(graph.nodes[p].nar_size for p in graph.closure_of(m)) for m in members}
    return sorted(members, key=lambda m: (closure_size[m], m))
