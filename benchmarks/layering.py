"""Layering benchmark: how many bytes does a node pull for a stream of images?

    python benchmarks/layering.py [--data DIR | --synthetic SEED [--stress]]
                                  [--popularity FILE] [--revision-bump] [--json]

For every algorithm, a node pulls the requested images in order and keeps every layer it has
pulled; a layer is identified by its set of store paths (a layer key,
docs/architecture.md#identity-and-caching), so it is
pulled again only when no earlier image had exactly that set. Reported per request set:

- ``pulled``: bytes pulled ÷ the size of the union of all closures (1.00 is ideal: every
  store path crosses the network once);
- ``chain``: the same under Docker's rule, where a layer is reused only below an identical
  stack of layers (ChainID, moby#38446); shows what manifest order is worth;
- ``layers``: store-path layers per image, mean and max (the budget is 94; the top layer
  with the symlink forest comes on top and is not counted);
- ``<100K``: share of the per-image layers under 100 kB (NixOS/nix#13155);
- ``ms``: planning time per image.

Rows: ours (``niximage_builder.layering``) with and without popularity data, and the
baselines of ``baselines_layering.py``: Nixery (with and without data), the dockerTools
popularity contest and nixpkgs' newer auto-layer (both with maxLayers 100, as published).

The data (``channel.json``, ``popularity.json``, ``requests.json``, ``requests-large.json``)
defaults to ``../shared/data/layering`` relative to the repository root. ``--synthetic
SEED`` instead generates a channel of the same kind with another seed and shape, to check
that nothing is fitted to one file (``--stress``: large closures up to 4× the budget
instead of 2.2×). ``--revision-bump`` renames a third of the packages to a new version while
keeping the old popularity file, as happens when the channel moves on, and adds a row that
looks popularity up by exact name only. ``--popularity FILE`` replaces the popularity data,
e.g. with another channel's, to see what wrong data does.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "builder"), str(ROOT / "core")]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines_layering import auto_layers, contest_layers, nixery_layers  # noqa: E402

from niximage_builder.closure import ClosureGraph, StorePath  # noqa: E402
from niximage_builder.layering import plan_layers  # noqa: E402
from niximage_builder.popularity import Popularity, parse_popularity, store_name  # noqa: E402

BUDGET = 94
SMALL = 100_000

Plan = Callable[[ClosureGraph], Sequence[Sequence[str]]]


@dataclass(frozen=True)
class Dataset:
    entries: Mapping[str, Mapping[str, Any]]
    """Channel: path → entry (path, narSize, references)."""
    popularity: Mapping[str, int]
    requests: Mapping[str, list[list[str]]]
    """Request set name → list of root lists."""


def load_dataset(directory: Path) -> Dataset:
    """Read the four files of a layering data directory."""
    channel = json.loads((directory / "channel.json").read_text())
    requests = {}
    for name, file in (("small", "requests.json"), ("large", "requests-large.json")):
        requests[name] = [r["roots"] for r in json.loads((directory / file).read_text())]
    return Dataset(
        {e["path"]: e for e in channel},
        json.loads((directory / "popularity.json").read_text()),
        requests,
    )


def image_graph(entries: Mapping[str, Mapping[str, Any]], roots: Iterable[str]) -> ClosureGraph:
    """The closure graph Nix would report for an image with these roots."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        path = stack.pop()
        if path not in seen:
            seen.add(path)
            stack.extend(entries[path]["references"])
    nodes = {}
    for path in seen:
        refs = tuple(sorted({r for r in entries[path]["references"] if r != path}))
        nodes[path] = StorePath(path, refs, int(entries[path]["narSize"]))
    return ClosureGraph(tuple(sorted(set(roots))), nodes)


@dataclass
class Result:
    pulled: float
    chain: float
    layers_mean: float
    layers_max: int
    small_share: float
    ms_per_image: float
    over_budget: int


def simulate(graphs: Sequence[ClosureGraph], plan: Plan) -> Result:
    """Pull every image in order on one node; count bytes as described in the module doc."""
    have: set[frozenset[str]] = set()
    chains: set[tuple[frozenset[str], ...]] = set()
    union: dict[str, int] = {}
    pulled = chain_pulled = small = count = layers_max = over = 0
    elapsed = 0.0
    for graph in graphs:
        start = time.perf_counter()
        layers = plan(graph)
        elapsed += time.perf_counter() - start
        check_partition(graph, layers)
        chain: tuple[frozenset[str], ...] = ()
        for paths in layers:
            key = frozenset(paths)
            size = sum(graph.nodes[p].nar_size for p in paths)
            if key not in have:
                have.add(key)
                pulled += size
            chain = (*chain, key)
            if chain not in chains:
                chains.add(chain)
                chain_pulled += size
            small += size < SMALL
        count += len(layers)
        layers_max = max(layers_max, len(layers))
        over += len(layers) > BUDGET
        union.update((p, n.nar_size) for p, n in graph.nodes.items())
    ideal = sum(union.values())
    return Result(
        pulled / ideal,
        chain_pulled / ideal,
        count / len(graphs),
        layers_max,
        small / count,
        1000 * elapsed / len(graphs),
        over,
    )


def check_partition(graph: ClosureGraph, layers: Sequence[Sequence[str]]) -> None:
    """Every path of the closure in exactly one layer; nothing else."""
    flat = [p for layer in layers for p in layer]
    if len(flat) != len(set(flat)) or set(flat) != set(graph.nodes):
        raise AssertionError("layers do not partition the closure")


def algorithms(popularity: Mapping[str, int], exact: bool = False) -> dict[str, Plan]:
    """The rows of the table: ours and the baselines, with and without popularity data
    (and ours with exact-name popularity lookups, when ``exact``)."""

    def ours(p: Popularity | None) -> Plan:
        return lambda g: [layer.paths for layer in plan_layers(g, p, BUDGET)]

    rows = {"niximage": ours(parse_popularity(popularity))}
    if exact:
        rows["niximage, exact names"] = ours(parse_popularity(popularity, match_pname=False))
    return rows | {
        "niximage, no popularity": ours(None),
        "nixery": lambda g: nixery_layers(g, popularity, BUDGET),
        "nixery, no popularity": lambda g: nixery_layers(g, None, BUDGET),
        "contest (maxLayers 100)": lambda g: contest_layers(g, 100),
        "auto-layer (maxLayers 100)": lambda g: auto_layers(g, 100),
    }


# --- a second channel of the same kind -------------------------------------------------------

_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"


def _hash(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(32))


def _size(rng: random.Random, median: float, sigma: float) -> int:
    return max(1024, int(rng.lognormvariate(0, sigma) * median))


def synthetic_dataset(seed: int, large_max: float = 2.2) -> Dataset:
    """A channel shaped like nixpkgs but unlike the stored one: a base set every package
    builds on, libraries that refer to base and to older libraries (a few versions of some),
    applications with optional ``-lib`` outputs, heavy-tailed sizes; popcount over it; small
    requests (a few well-known packages and apps) and large ones (apps and a few libraries
    added until the closure passes a target between the budget and ``large_max`` × budget
    paths; the stored set goes up to 2.1×). The shape parameters are drawn from the seed, so
    every seed is a different channel."""
    rng = random.Random(seed)
    n_base = rng.randint(30, 70)
    n_libs = rng.randint(250, 700)
    n_apps = rng.randint(1000, 2500)
    lib_median = rng.choice([150e3, 400e3, 1e6])
    app_median = rng.choice([500e3, 2e6, 5e6])
    sigma = rng.uniform(1.6, 2.6)
    entries: dict[str, dict[str, Any]] = {}

    def add(name: str, size: int, refs: Iterable[str]) -> str:
        path = f"/nix/store/{_hash(rng)}-{name}"
        selfref = rng.random() < 0.5
        entries[path] = {
            "path": path,
            "narSize": size,
            "references": sorted({*refs, *([path] if selfref else [])}),
        }
        return path

    base: list[str] = []
    for i in range(n_base):
        weights = [1 / (j + 1) for j in range(len(base))]
        k = min(len(base), rng.randint(0, 3))
        refs = set(rng.choices(base, weights, k=k)) if base else set()
        base.append(
            add(
                f"base{i:02d}-{rng.randint(1, 9)}.{rng.randint(0, 40)}",
                _size(rng, 800e3, sigma),
                refs,
            )
        )
    libs: list[str] = []
    for i in range(n_libs):
        refs = {base[0]} | set(rng.choices(base, [1 / (j + 1) for j in range(n_base)], k=2))
        if libs:
            refs |= set(rng.choices(libs, k=rng.randint(0, 3)))
        name = f"lib{rng.choice(['ab', 'cd', 'ef', 'gh', 'ij', 'kl'])}{i % 97}"
        libs.append(
            add(
                f"{name}-{rng.randint(0, 9)}.{rng.randint(0, 40)}.{i}",
                _size(rng, lib_median, sigma),
                refs,
            )
        )
    apps: list[str] = []
    lib_weights = [1 / (j + 1) ** 0.7 for j in range(n_libs)]
    for i in range(n_apps):
        version = f"{rng.randint(0, 20)}.{rng.randint(0, 30)}"
        refs = {base[0]} | set(rng.choices(base, [1 / (j + 1) for j in range(n_base)], k=3))
        refs |= set(rng.choices(libs, lib_weights, k=rng.randint(0, 4)))
        if rng.random() < 0.15:
            refs.add(add(f"app{i:05d}-{version}-lib", _size(rng, app_median, sigma), {base[0]}))
        apps.append(add(f"app{i:05d}-{version}", _size(rng, app_median, sigma), refs))
    counts: dict[str, int] = {}
    for entry in entries.values():
        for ref in entry["references"]:
            name = store_name(ref)
            counts[name] = counts.get(name, 0) + 1
    popularity = {name: c for name, c in counts.items() if c > 1}

    def closure_len(roots: list[str]) -> int:
        return len(image_graph(entries, roots).nodes)

    small = []
    well_known = base[:12]
    for _ in range(200):
        roots = rng.sample(well_known, rng.randint(0, 3)) + rng.sample(apps, rng.randint(0, 2))
        small.append(sorted(set(roots or [rng.choice(apps)])))
    large = []
    for _ in range(40):
        target = rng.randint(BUDGET + 1, int(large_max * BUDGET))
        roots = []
        while closure_len(roots) < target:
            roots.append(rng.choice(apps) if rng.random() < 0.9 else rng.choice(libs))
        large.append(sorted(set(roots)))
    return Dataset(entries, popularity, {"small": small, "large": large})


def revision_bump(data: Dataset, seed: int = 1) -> Dataset:
    """The next channel revision: a third of the packages get a new version (and every path
    a new hash); requests and graph keep their shape; the popularity file stays the old one."""
    rng = random.Random(seed)
    renamed: dict[str, str] = {}
    for path in sorted(data.entries):
        name = store_name(path)
        if rng.random() < 1 / 3:
            head, dash, tail = name.partition("-")
            name = f"{head}-9{tail}" if dash else f"{name}-1"
        renamed[path] = f"/nix/store/{_hash(rng)}-{name}"
    entries = {
        renamed[p]: {**e, "path": renamed[p], "references": [renamed[r] for r in e["references"]]}
        for p, e in data.entries.items()
    }
    requests = {k: [[renamed[r] for r in roots] for roots in v] for k, v in data.requests.items()}
    return Dataset(entries, data.popularity, requests)


# --- report ------------------------------------------------------------------------------------


def run(data: Dataset, exact: bool = False) -> dict[str, dict[str, Result]]:
    """Every algorithm on every request set."""
    graphs = {
        name: [image_graph(data.entries, roots) for roots in sets]
        for name, sets in data.requests.items()
    }
    return {
        algo: {name: simulate(gs, plan) for name, gs in graphs.items()}
        for algo, plan in algorithms(data.popularity, exact).items()
    }


def table(results: Mapping[str, Mapping[str, Result]]) -> str:
    """A plain-text table, one row per algorithm and request set."""
    head = (
        f"{'algorithm':<28} {'set':<6} {'pulled':>7} {'chain':>7} {'layers':>12}"
        f" {'<100K':>6} {'max/budget':>11} {'ms':>6}"
    )
    lines = [head, "-" * len(head)]
    for algo, by_set in results.items():
        for name, r in by_set.items():
            lines.append(
                f"{algo:<28} {name:<6} {r.pulled:>6.2f}x {r.chain:>6.2f}x"
                f" {r.layers_mean:>6.1f}/{r.layers_max:<5d} {100 * r.small_share:>5.1f}%"
                f" {r.layers_max:>5d}/{BUDGET:<5d} {r.ms_per_image:>6.1f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/layering")
    parser.add_argument("--synthetic", type=int, metavar="SEED", help="generate a channel")
    parser.add_argument(
        "--stress",
        action="store_true",
        help="synthetic large closures up to 4x the budget (default 2.2x)",
    )
    parser.add_argument("--revision-bump", action="store_true", help="move versions on")
    parser.add_argument("--popularity", type=Path, help="use this popularity file instead")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.synthetic is not None:
        data = synthetic_dataset(args.synthetic, 4.0 if args.stress else 2.2)
    else:
        data = load_dataset(args.data)
    if args.popularity is not None:
        data = replace(data, popularity=json.loads(args.popularity.read_text()))
    if args.revision_bump:
        data = revision_bump(data)
    results = run(data, exact=args.revision_bump)
    if args.json:
        print(
            json.dumps(
                {a: {s: vars(r) for s, r in by.items()} for a, by in results.items()}, indent=2
            )
        )
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
