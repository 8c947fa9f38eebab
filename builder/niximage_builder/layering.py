"""Layering: split a runtime closure into OCI layers. Pure; placeholder (helpers only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from niximage_builder.closure import ClosureGraph


@dataclass(frozen=True)
class Layer:
    paths: tuple[str, ...]
    size: int


def postorder(succ: Mapping[str, Sequence[str]], starts: Sequence[str]) -> list[str]:
    """Depth-first post-order from ``starts`` (successors first), without recursion."""
    seen: set[str] = set()
    order: list[str] = []
    for start in starts:
        if start in seen:
            continue
        seen.add(start)
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            node, i = stack[-1]
            children = succ.get(node, ())
            if i < len(children):
                stack[-1] = (node, i + 1)
                child = children[i]
                if child not in seen:
                    seen.add(child)
                    stack.append((child, 0))
            else:
                stack.pop()
                order.append(node)
    return order


def immediate_dominators(succ: Mapping[str, Sequence[str]], start: str) -> dict[str, str]:
    """Cooper, Harvey & Kennedy's iterative algorithm; ``idom[start] == start``."""
    post = postorder(succ, [start])
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
            new = None
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
    """Path → total narSize of its closure (itself included)."""
    succ = {p: n.references for p, n in graph.nodes.items()}
    order = postorder(succ, sorted(graph.nodes))
    index = {p: i for i, p in enumerate(order)}
    bits: dict[str, int] = {}
    for p in order:
        b = 1 << index[p]
        for r in succ[p]:
            b |= bits[r]
        bits[p] = b
    sizes_by_index = [graph.nodes[p].nar_size for p in order]
    result = {}
    for p, b in bits.items():
        total = 0
        while b:
            low = b & -b
            total += sizes_by_index[low.bit_length() - 1]
            b ^= low
        result[p] = total
    return result


# ---- experimental --------------------------------------------------------------------------
from niximage_builder.popularity import Popularity  # noqa: E402

SMALL_LAYER = 100_000
ORACLE = {}
OPTS = {"exclusive": "pop2", "merge_big_exclusive": True, "nopop": "none", "order": "pop"}


def plan_layers(graph: ClosureGraph, popularity: Popularity | None = None, budget: int = 94):
    o = OPTS
    pop = popularity
    referrers = graph.referrers()
    size = {p: n.nar_size for p, n in graph.nodes.items()}

    def owner(p):
        refs = referrers[p]
        if len(refs) != 1:
            return None
        if pop is None:
            if o["nopop"] == "none":
                return None
            excl = True
        else:
            c = pop.count_of_path(p)
            excl = c <= (2 if o["exclusive"] == "pop2" else 1)
        if not excl:
            return None
        if not o["merge_big_exclusive"] and size[p] >= SMALL_LAYER:
            return None
        return refs[0]

    own = {p: owner(p) for p in sorted(graph.nodes)}

    def head(p):
        while own[p] is not None:
            p = own[p]
        return p

    units = {}
    for p in sorted(graph.nodes):
        units.setdefault(head(p), []).append(p)
    usize = {h: sum(size[p] for p in m) for h, m in units.items()}
    popu0 = pop or Popularity.empty()
    def tier(h):
        if not o.get("tiers"):
            return 0
        c = popu0.count_of_path(h) if pop is not None else len(referrers[h])
        return c.bit_length()
    def split(threshold):
        keep = [h for h in units if usize[h] >= threshold]
        bags = {}
        for h in units:
            if usize[h] < threshold:
                bags.setdefault(tier(h), []).append(h)
        return keep, bags
    threshold = SMALL_LAYER
    keep, bags = split(threshold)
    if o.get("quant"):
        while len(keep) + len(bags) > budget:
            threshold *= o["quant"]
            keep, bags = split(threshold)
    popu1 = pop or Popularity.empty()
    cnt1 = {p: popu1.count_of_path(p) if pop is not None else len(referrers[p]) for p in graph.nodes}
    succ1 = {p: n.references for p, n in graph.nodes.items()}
    tp1 = dict(cnt1)
    for p in postorder(succ1, sorted(graph.nodes))[::-1]:
        for r in succ1[p]:
            tp1[r] = max(tp1[r], tp1[p])
    anc1 = {p: 0 for p in graph.nodes}
    if o.get("select") == "anc":
        for p in graph.nodes:
            for q in graph.closure_of([p]):
                anc1[q] += 1
    sel = o.get("select", "size")
    if sel == "size":
        keep.sort(key=lambda h: (usize[h], h))
    elif sel == "cnt":
        keep.sort(key=lambda h: (usize[h] * max(cnt1[h], 1), h))
    elif sel == "tp":
        keep.sort(key=lambda h: (usize[h] * max(tp1[h], 1), h))
    elif sel == "anc":
        keep.sort(key=lambda h: (usize[h] * anc1[h], h))
    bag = []
    while len(keep) + len(bags) + (1 if bag else 0) > budget:
        bag.append(keep.pop(0))
    if bag:
        bags.setdefault(-1, []).extend(bag)
    popu = pop or Popularity.empty()
    cnt = {p: popu.count_of_path(p) if pop is not None else len(referrers[p]) for p in graph.nodes}
    succ = {p: n.references for p, n in graph.nodes.items()}
    topo = postorder(succ, sorted(graph.nodes))[::-1]
    tp = dict(cnt)
    for p in topo:
        for r in succ[p]:
            tp[r] = max(tp[r], tp[p])
    cs = closure_sizes(graph)
    if o["order"] == "pop":
        key = lambda h: (-cnt[h], -usize[h], h)
    elif o["order"] == "tp":
        key = lambda h: (-tp[h], -cnt[h], h)
    elif o["order"] == "cs":
        key = lambda h: (cs[h], h)
    elif o["order"] == "popsize":
        key = lambda h: (-cnt[h] * usize[h], h)
    elif o["order"] == "tpsize":
        key = lambda h: (-tp[h] * usize[h], h)
    elif o["order"] == "oraclesize":
        key = lambda h: (-ORACLE.get(h, 0) * usize[h], h)
    elif o["order"] == "trsize":
        anc = {p: 0 for p in graph.nodes}
        for p in graph.nodes:
            for q in graph.closure_of([p]):
                anc[q] += 1
        key = lambda h: (-(anc[h] if pop is None else cnt[h]) * usize[h], h)
    elif o["order"] == "oracle":
        key = lambda h: (-ORACLE.get(h, 0), h)
    keep.sort(key=key)
    layers = [Layer(tuple(sorted(units[h])), usize[h]) for h in keep]
    for t in sorted(bags, reverse=True):
        paths = tuple(sorted(p for h in bags[t] for p in units[h]))
        layers.append(Layer(paths, sum(size[p] for p in paths)))
    return layers
