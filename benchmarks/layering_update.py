"""Update benchmark: what does a node re-pull when the package set moves? (issue 17)

    python benchmarks/layering_update.py [--data DIR | --synthetic SEED] [--seed N]
                                         [--seeds N] [--app-share S] [--json FILE]

The channel of ``layering.py`` is bumped, deterministically (``--seed``), in three scenarios:

- ``2% app bump``: 2% of the store paths change, drawn among applications: paths at most one
  other path refers to (apps and their ``-lib`` outputs; ``--app-share S`` draws only that share
  there and the rest among all other paths, which makes the figure depend on whether the draw
  hits a base library);
- ``10% bump``: 10% of the store paths change, drawn uniformly;
- ``core lib bump``: the one path with the most referrers changes.

As in Nix, a changed path gets a new store path (new hash, same name, size ±5%) and so does
every path that refers to a bumped one, transitively (new hash, same name and size); the new
graph's references name the new paths. Request roots follow their renames; the popularity data
(keyed by name) is the old one, as ``layering.py`` uses it.

For every image and algorithm, the layers before are planned on the old closure and the layers
after on the new one. A layer is identified by its set of store paths (the same set gives the
same digest). Per image, ``re-pulled`` is the size of the after-layers whose set is not among the
image's before-layers, and ``changed`` the size of the paths of the new closure that are not in
the old one (the least any layering can make a node pull). Reported per scenario, request set
and algorithm, over the images with changed bytes: sum(re-pulled) ÷ sum(changed) (``ratio``)
and the median and max of the per-image ratio. Target: ≤ 1.10 for ours (``niximage``).
``--seeds N`` repeats the bumps with the next seeds and prints each ratio's spread: the 2%
bump's figure depends much on which applications the draw hits.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from layering import (
    ROOT,
    Dataset,
    Plan,
    _hash,
    algorithms,
    check_partition,
    image_graph,
    load_dataset,
    synthetic_dataset,
)

from niximage_builder.closure import ClosureGraph
from niximage_builder.popularity import store_name

TARGET = 1.10
APP_SHARE = 1.0
"""Default share of the 2% bump's changed paths drawn among applications."""
APP_MAX_REFERRERS = 1
SIZE_JITTER = 0.05


@dataclass(frozen=True)
class Bump:
    name: str
    data: Dataset
    renamed: Mapping[str, str]
    """Old path → new path, for every bumped path (changed or rebuilt)."""
    changed: int
    """Paths changed at the source (the rest of ``renamed`` are rebuilt referrers)."""


@dataclass
class Row:
    scenario: str
    request_set: str
    algorithm: str
    images: int
    """Images whose closure has changed bytes (the others are left out)."""
    total_images: int
    changed_bytes: int
    repulled_bytes: int
    ratio: float
    median: float
    max: float


def referrers(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, set[str]]:
    """Path → the other paths that refer to it directly."""
    result: dict[str, set[str]] = {path: set() for path in entries}
    for path, entry in entries.items():
        for ref in entry["references"]:
            if ref != path:
                result[ref].add(path)
    return result


def bump(data: Dataset, name: str, changed: Sequence[str], rng: random.Random) -> Bump:
    """The channel after ``changed`` moved on: they and their referrers (transitively) get new
    store paths; changed paths' sizes move by up to ±5%."""
    back = referrers(data.entries)
    bumped: set[str] = set()
    stack = list(changed)
    while stack:
        path = stack.pop()
        if path not in bumped:
            bumped.add(path)
            stack.extend(back[path])
    renamed = {p: f"/nix/store/{_hash(rng)}-{store_name(p)}" for p in sorted(bumped)}
    sizes = {
        p: max(
            1,
            round(int(data.entries[p]["narSize"]) * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)),
        )
        for p in sorted(changed)
    }
    entries: dict[str, Mapping[str, Any]] = {}
    for path, entry in data.entries.items():
        if path not in bumped:
            entries[path] = entry
            continue
        new = renamed[path]
        entries[new] = {
            "path": new,
            "narSize": sizes.get(path, int(entry["narSize"])),
            "references": sorted(renamed.get(r, r) for r in entry["references"]),
        }
    requests = {
        k: [[renamed.get(r, r) for r in roots] for roots in v] for k, v in data.requests.items()
    }
    return Bump(name, Dataset(entries, data.popularity, requests), renamed, len(changed))


def scenarios(data: Dataset, seed: int, app_share: float = APP_SHARE) -> list[Bump]:
    """The three bumps of the module doc, each with its own seeded generator."""
    paths = sorted(data.entries)
    back = referrers(data.entries)
    apps = [p for p in paths if len(back[p]) <= APP_MAX_REFERRERS]
    others = [p for p in paths if len(back[p]) > APP_MAX_REFERRERS]

    rng = random.Random(f"{seed}/app")
    n = round(0.02 * len(paths))
    n_apps = min(len(apps), round(app_share * n))
    app_bump = rng.sample(apps, n_apps) + rng.sample(others, min(len(others), n - n_apps))
    result = [bump(data, "2% app bump", app_bump, rng)]

    rng = random.Random(f"{seed}/uniform")
    result.append(bump(data, "10% bump", rng.sample(paths, round(0.1 * len(paths))), rng))

    rng = random.Random(f"{seed}/core")
    core = max(paths, key=lambda p: (len(back[p]), p))
    result.append(bump(data, f"core lib bump ({store_name(core)})", [core], rng))
    return result


def layer_keys(graph: ClosureGraph, plan: Plan) -> dict[frozenset[str], int]:
    """The image's layers: path set → size."""
    layers = plan(graph)
    check_partition(graph, layers)
    return {frozenset(paths): sum(graph.nodes[p].nar_size for p in paths) for paths in layers}


def measure(
    before: Dataset,
    bumps: Sequence[Bump],
    plans: Mapping[str, Plan],
    progress: Callable[[str], None] = lambda _: None,
) -> list[Row]:
    """Every scenario × request set × algorithm, as described in the module doc."""
    old_graphs = {
        name: [image_graph(before.entries, roots) for roots in sets]
        for name, sets in before.requests.items()
    }
    old_layers = {
        (algo, name): [layer_keys(g, plan) for g in graphs]
        for algo, plan in plans.items()
        for name, graphs in old_graphs.items()
    }
    rows = []
    for b in bumps:
        progress(b.name)
        for name, sets in b.data.requests.items():
            new_graphs = [image_graph(b.data.entries, roots) for roots in sets]
            changed = [
                sum(n.nar_size for p, n in new.nodes.items() if p not in old.nodes)
                for old, new in zip(old_graphs[name], new_graphs, strict=True)
            ]
            for algo, plan in plans.items():
                repulled = []
                for old_keys, new in zip(old_layers[algo, name], new_graphs, strict=True):
                    after = layer_keys(new, plan)
                    repulled.append(sum(s for k, s in after.items() if k not in old_keys))
                pairs = [(r, c) for r, c in zip(repulled, changed, strict=True) if c > 0]
                ratios = [r / c for r, c in pairs]
                total_r = sum(r for r, _ in pairs)
                total_c = sum(c for _, c in pairs)
                rows.append(
                    Row(
                        b.name,
                        name,
                        algo,
                        len(pairs),
                        len(sets),
                        total_c,
                        total_r,
                        total_r / total_c if total_c else float("nan"),
                        statistics.median(ratios) if ratios else float("nan"),
                        max(ratios) if ratios else float("nan"),
                    )
                )
    return rows


def describe(before: Dataset, b: Bump) -> str:
    total = sum(int(e["narSize"]) for e in before.entries.values())
    moved = sum(int(b.data.entries[new]["narSize"]) for new in b.renamed.values())
    return (
        f"{b.name}: {b.changed} paths changed, {len(b.renamed)} of {len(before.entries)}"
        f" store paths new ({100 * moved / total:.1f}% of the channel's bytes)"
    )


def table(rows: Sequence[Row]) -> str:
    head = (
        f"{'set':<6} {'algorithm':<28} {'images':>8} {'changed MB':>11} {'re-pulled MB':>13}"
        f" {'ratio':>7} {'median':>7} {'max':>8}"
    )
    lines: list[str] = []
    scenario = None
    for r in rows:
        if r.scenario != scenario:
            scenario = r.scenario
            lines += ["", f"== {scenario}", head, "-" * len(head)]
        mark = ""
        if r.algorithm == "niximage":
            mark = "  ok" if r.ratio <= TARGET else f"  over target {TARGET:.2f}"
        lines.append(
            f"{r.request_set:<6} {r.algorithm:<28} {r.images:>3d}/{r.total_images:<4d}"
            f" {r.changed_bytes / 1e6:>11.1f} {r.repulled_bytes / 1e6:>13.1f}"
            f" {r.ratio:>6.2f}x {r.median:>6.2f}x {r.max:>7.2f}x{mark}"
        )
    return "\n".join(lines[1:])


def spread(runs: Sequence[Sequence[Row]]) -> str:
    """Per scenario kind, request set and algorithm: the ratio's range and median over seeds."""
    by: dict[tuple[str, str, str], list[float]] = {}
    for rows in runs:
        for r in rows:
            kind = r.scenario.split(" (")[0]
            by.setdefault((kind, r.request_set, r.algorithm), []).append(r.ratio)
    head = (
        f"{'scenario':<14} {'set':<6} {'algorithm':<28} {'ratio min':>9} {'median':>7} {'max':>7}"
    )
    lines = [f"ratio over {len(runs)} seeds", head, "-" * len(head)]
    for (kind, name, algo), ratios in by.items():
        lines.append(
            f"{kind:<14} {name:<6} {algo:<28} {min(ratios):>8.2f}x"
            f" {statistics.median(ratios):>6.2f}x {max(ratios):>6.2f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/layering")
    parser.add_argument("--synthetic", type=int, metavar="SEED", help="generate a channel")
    parser.add_argument("--seed", type=int, default=17, help="seed of the bumps (default 17)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument(
        "--app-share",
        type=float,
        default=APP_SHARE,
        help=f"share of the 2%% bump drawn among applications (default {APP_SHARE})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="also run seeds seed+1 … seed+N-1 and print the ratio's spread over them",
    )
    args = parser.parse_args(argv)
    if args.synthetic is not None:
        data = synthetic_dataset(args.synthetic)
    else:
        data = load_dataset(args.data)
    bumps = scenarios(data, args.seed, args.app_share)
    print(f"target: re-pulled ÷ changed ≤ {TARGET:.2f} for niximage (ratio column)")
    for b in bumps:
        print(describe(data, b))
    print()
    plans = algorithms(data.popularity)
    rows = measure(data, bumps, plans)
    print(table(rows))
    runs = [rows]
    for seed in range(args.seed + 1, args.seed + args.seeds):
        runs.append(measure(data, scenarios(data, seed, args.app_share), plans))
    if args.seeds > 1:
        print()
        print(spread(runs))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "target": TARGET,
                    "seed": args.seed,
                    "app_share": args.app_share,
                    "scenarios": [describe(data, b) for b in bumps],
                    "rows": [asdict(r) for r in rows],
                    "seeds": [[asdict(r) for r in rs] for rs in runs],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
