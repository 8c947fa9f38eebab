"""Layering (``niximage_builder.layering``) and popularity (``niximage_builder.popularity``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from niximage_builder.closure import ClosureGraph, parse_graph
from niximage_builder.layering import (
    SMALL_LAYER,
    Layer,
    chunk_small,
    layers_command,
    layers_to_json,
    plan_layers,
    sharing_estimates,
)
from niximage_builder.popularity import (
    Popularity,
    load,
    parse_popularity,
    pname_key,
    store_name,
)
from niximage_core.errors import InvalidInput

MB = 1_000_000
kB = 1_000


def store(name: str) -> str:
    """A store path whose hash is derived from the name; up to 16 characters, the paths sort
    like the names (so that ties broken by path are easy to read in the tests)."""
    raw = name.encode()
    digest = raw.hex().ljust(32, "0") if len(raw) <= 16 else hashlib.sha256(raw).hexdigest()
    return f"/nix/store/{digest[:32]}-{name}"


def graph_of(
    sizes: Mapping[str, int], refs: Mapping[str, Sequence[str]], roots: Sequence[str]
) -> ClosureGraph:
    """A closure graph from names; ``roots`` are what the image asks for."""
    entries = [
        {"path": store(n), "narSize": size, "references": [store(r) for r in refs.get(n, ())]}
        for n, size in sizes.items()
    ]
    full = parse_graph({"roots": [store(r) for r in roots], "graph": entries})
    keep = full.closure_of(full.roots)
    return ClosureGraph(full.roots, {p: full.nodes[p] for p in sorted(keep)})


def names(layers: Sequence[Layer]) -> list[list[str]]:
    return [sorted(store_name(p) for p in layer.paths) for layer in layers]


# --- the worked example of the module docstring ----------------------------------------------

EXAMPLE_SIZES = {
    "A-1.0": 5 * MB,
    "B-1.0": 4 * MB,
    "C-1.0": 40 * kB,
    "D-1.0": 20 * kB,
    "G-2.38": 30 * MB,
    "L-1.0": 1 * MB,
}
EXAMPLE_REFS = {"A-1.0": ["L-1.0"], "B-1.0": ["L-1.0"], "C-1.0": ["G-2.38"], "L-1.0": ["G-2.38"]}
EXAMPLE_POPULARITY = Popularity.from_counts({"G-2.38": 2000, "L-1.0": 12})


def example(roots: Sequence[str] = ("A-1.0", "B-1.0", "C-1.0", "D-1.0")) -> ClosureGraph:
    return graph_of(EXAMPLE_SIZES, EXAMPLE_REFS, roots)


def test_worked_example() -> None:
    layers = plan_layers(example(), EXAMPLE_POPULARITY)
    assert names(layers) == [["G-2.38"], ["L-1.0"], ["A-1.0"], ["B-1.0"], ["C-1.0", "D-1.0"]]
    assert [layer.size for layer in layers] == [30 * MB, 1 * MB, 5 * MB, 4 * MB, 60 * kB]


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (5, [["G-2.38"], ["L-1.0"], ["A-1.0"], ["B-1.0"], ["C-1.0", "D-1.0"]]),
        (4, [["G-2.38"], ["A-1.0"], ["B-1.0"], ["C-1.0", "D-1.0", "L-1.0"]]),
        (2, [["G-2.38"], ["A-1.0", "B-1.0", "C-1.0", "D-1.0", "L-1.0"]]),
        (1, [sorted(EXAMPLE_SIZES)]),
    ],
)
def test_worked_example_budgets(budget: int, expected: list[list[str]]) -> None:
    assert names(plan_layers(example(), EXAMPLE_POPULARITY, budget)) == expected


def test_worked_example_second_image_reuses_every_layer() -> None:
    first = {layer.paths for layer in plan_layers(example(), EXAMPLE_POPULARITY)}
    second = plan_layers(example(["B-1.0"]), EXAMPLE_POPULARITY)
    assert names(second) == [["G-2.38"], ["L-1.0"], ["B-1.0"]]
    assert all(layer.paths in first for layer in second)


def test_worked_example_without_popularity() -> None:
    """Popularity is then 1 + the dependents in the image: G 5 × 30 MB, A 1 × 5 MB, B 1 × 4 MB,
    L 3 × 1 MB; the same layers in another order."""
    assert names(plan_layers(example())) == [
        ["G-2.38"],
        ["A-1.0"],
        ["B-1.0"],
        ["L-1.0"],
        ["C-1.0", "D-1.0"],
    ]


def test_an_empty_popularity_file_is_no_data() -> None:
    empty = Popularity.from_counts({})
    assert plan_layers(example(), empty) == plan_layers(example())


def test_wrong_popularity_data_changes_the_order_only() -> None:
    """Data from another channel may mislead the order, never the grouping."""
    wrong = Popularity.from_counts({"A-1.0": 10**6, "D-1.0": 10**6})
    assert sorted(layer.paths for layer in plan_layers(example(), wrong)) == sorted(
        layer.paths for layer in plan_layers(example(), EXAMPLE_POPULARITY)
    )


# --- plain properties ----------------------------------------------------------------------


def test_budget_below_one_is_invalid() -> None:
    with pytest.raises(InvalidInput):
        plan_layers(example(), None, 0)


def test_empty_graph_has_no_layers() -> None:
    assert plan_layers(ClosureGraph((), {})) == []


def test_one_tiny_path_is_one_layer() -> None:
    graph = graph_of({"tiny-1": 10}, {}, ["tiny-1"])
    assert plan_layers(graph) == [Layer((store("tiny-1"),), 10)]


def test_layers_to_json() -> None:
    layers = [Layer(("/nix/store/a-x",), 3), Layer(("/nix/store/b-y", "/nix/store/c-z"), 5)]
    assert layers_to_json(layers) == [
        {"paths": ["/nix/store/a-x"], "size": 3},
        {"paths": ["/nix/store/b-y", "/nix/store/c-z"], "size": 5},
    ]


def test_most_shared_layer_first() -> None:
    """glibc (referred to by everything) leads, with or without data; small layers come last."""
    sizes = {"glibc-2.38": 30 * MB, "app-1": 50 * MB, "other-2": 40 * MB, "tiny-1": 5 * kB}
    refs = {"app-1": ["glibc-2.38", "tiny-1"], "other-2": ["glibc-2.38"]}
    graph = graph_of(sizes, refs, ["app-1", "other-2"])
    for popularity in (None, Popularity.from_counts({"glibc-2.38": 2000, "tiny-1": 3})):
        layers = plan_layers(graph, popularity)
        assert names(layers)[0] == ["glibc-2.38"]
        assert names(layers)[-1] == ["tiny-1"]


def test_cacert_ranks_first_without_data() -> None:
    sizes = {"glibc-2.38": 30 * MB, "app-1": 50 * MB, "cacert-3.95": 500 * kB}
    graph = graph_of(sizes, {"app-1": ["glibc-2.38"]}, ["app-1", "cacert-3.95"])
    sharing = sharing_estimates(graph, None)
    assert sharing[store("cacert-3.95")] > sharing[store("glibc-2.38")] == 2


def test_cacert_ranks_above_data() -> None:
    pop = Popularity.from_counts({"glibc-2.38": 2000})
    assert pop.count("cacert-3.95") > pop.count("glibc-2.38")
    assert pop.count("nss-cacert-3.95") == pop.count("iana-etc-20230316") == pop.top
    assert Popularity.empty().count("iana-etc-20230316") > 1


def test_graph_forms_give_the_same_layers(tmp_path: Path) -> None:
    """Nix 2.8's list, newer Nix's object, our file, and Nix's output without a wrapper."""
    graph = example()
    entries = graph.to_json()["graph"]
    as_object = {e["path"]: {k: v for k, v in e.items() if k != "path"} for e in entries}
    forms = {
        "ours.json": graph.to_json(),
        "list.json": {"roots": list(graph.roots), "graph": entries},
        "object.json": {"roots": list(graph.roots), "graph": as_object},
        "raw-list.json": entries,
        "raw-object.json": as_object,
        "plan.json": {"spec": {}, "roots": list(graph.roots), "closure": entries},
    }
    pop_file = tmp_path / "popularity.json"
    pop_file.write_text(json.dumps({"G-2.38": 2000, "L-1.0": 12}))
    expected = layers_to_json(plan_layers(graph, EXAMPLE_POPULARITY, 94))
    for name, data in forms.items():
        (tmp_path / name).write_text(json.dumps(data))
        assert layers_command(str(tmp_path / name), str(pop_file), 94) == expected, name
        if name != "plan.json":  # `niximage plan --json` output: layers_command only
            wrapped = data if isinstance(data, dict) and "graph" in data else {"graph": data}
            assert parse_graph(wrapped).nodes == graph.nodes


def test_layers_command_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        layers_command(str(tmp_path / "missing.json"), None, 94)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidInput):
        layers_command(str(bad), None, 94)
    bad.write_text(json.dumps({"spec": "jq"}))  # an object, but not of store paths
    with pytest.raises(InvalidInput, match="expected an object of store path"):
        layers_command(str(bad), None, 94)
    good = tmp_path / "graph.json"
    good.write_text(json.dumps(example().to_json()))
    pop = tmp_path / "pop.json"
    pop.write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(InvalidInput):
        layers_command(str(good), str(pop), 94)
    assert layers_command(str(good), None, 3) == layers_to_json(plan_layers(example(), None, 3))


def test_same_layers_in_a_process_with_another_hash_seed(tmp_path: Path) -> None:
    graph = random_channel_graph(seed=7)
    graph_file = tmp_path / "graph.json"
    graph_file.write_text(json.dumps(graph.to_json()))
    pop_file = tmp_path / "pop.json"
    pop_file.write_text(json.dumps(popcount(graph)))
    here = layers_command(str(graph_file), str(pop_file), 10)
    code = (
        "import json, sys; from niximage_builder.layering import layers_command; "
        "print(json.dumps(layers_command(sys.argv[1], sys.argv[2], 10)))"
    )
    builder = Path(__file__).resolve().parents[2] / "builder"
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(builder)}
        out = subprocess.run(
            [sys.executable, "-c", code, str(graph_file), str(pop_file)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(out) == here


# --- popularity ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("gcc-12.3.0-lib", "gcc-lib"),
        ("gcc-12.3.0", "gcc"),
        ("python3-3.11.6", "python3"),
        ("glibc-2.38-27", "glibc"),
        ("util-linux-minimal-2.39.2-lib", "util-linux-minimal-lib"),
        ("xgcc-12.3.0-libgcc", "xgcc-libgcc"),
        ("bash-5.2p15", "bash"),
        ("foo-1.0-rc1", "foo"),
        ("iana-etc-20230316", "iana-etc"),
        ("hello", "hello"),
    ],
)
def test_pname_key(name: str, key: str) -> None:
    assert pname_key(name) == key


def test_popularity_falls_back_to_the_name_without_version() -> None:
    pop = parse_popularity({"openssl-3.0.12": 145, "libfoo-1.1": 3, "libfoo-1.2": 7})
    assert pop.count("openssl-3.0.12") == 145
    assert pop.count("openssl-3.0.13") == 145  # the next revision
    assert pop.count("libfoo-9.9") == 7  # the highest count of any version
    assert pop.count("libfoo-1.1") == 3  # an exact key wins
    assert pop.count("unknown-1.0") == 1
    exact = parse_popularity({"openssl-3.0.12": 145}, match_pname=False)
    assert exact.count("openssl-3.0.13") == 1
    assert pop.count_of_path("/nix/store/" + "a" * 32 + "-openssl-3.0.12") == 145


def test_popularity_load(tmp_path: Path) -> None:
    file = tmp_path / "popularity.json"
    file.write_text(json.dumps({"openssl-3.0.12": 145}))
    assert load(file).count("openssl-3.1.0") == 145
    with pytest.raises(InvalidInput):
        load(tmp_path / "missing.json")


@pytest.mark.parametrize("data", [[], {"a": "1"}, {"a": -1}, {"a": True}, {"a": 1.5}])
def test_popularity_rejects_malformed_data(data: object) -> None:
    with pytest.raises(InvalidInput):
        parse_popularity(data)


# --- random channels ----------------------------------------------------------------------


def random_channel_graph(seed: int, n: int = 60) -> ClosureGraph:
    """A DAG with heavy-tailed sizes; every path a root (the whole channel)."""
    rng = random.Random(seed)
    sizes = {f"p{i:03d}-1.{i}": int(rng.lognormvariate(12, 2.5)) + 1 for i in range(n)}
    order = list(sizes)
    refs = {
        name: rng.sample(order[:i], min(i, rng.choice([0, 1, 1, 2, 3])))
        for i, name in enumerate(order)
    }
    return graph_of(sizes, refs, order)


def popcount(graph: ClosureGraph) -> dict[str, int]:
    """Nixery's popcount over a channel: referrers per name, count-1 entries left out."""
    counts: dict[str, int] = {}
    for node in graph.nodes.values():
        for ref in node.references:
            counts[store_name(ref)] = counts.get(store_name(ref), 0) + 1
    return {name: c for name, c in counts.items() if c > 1}


@st.composite
def channels(draw: st.DrawFn) -> tuple[ClosureGraph, Popularity]:
    """A random channel (DAG) and its popcount."""
    n = draw(st.integers(1, 18))
    sizes = {
        f"p{i:02d}-1.0": draw(
            st.one_of(st.integers(1, SMALL_LAYER - 1), st.integers(SMALL_LAYER, 10**9))
        )
        for i in range(n)
    }
    order = list(sizes)
    refs = {
        name: draw(st.lists(st.sampled_from(order[:i]), max_size=4, unique=True)) if i else []
        for i, name in enumerate(order)
    }
    channel = graph_of(sizes, refs, order)
    return channel, parse_popularity(popcount(channel))


def image(channel: ClosureGraph, roots: Sequence[str]) -> ClosureGraph:
    keep = channel.closure_of(roots)
    return ClosureGraph(tuple(sorted(set(roots))), {p: channel.nodes[p] for p in sorted(keep)})


def check_partition(graph: ClosureGraph, layers: Sequence[Layer]) -> None:
    flat = [p for layer in layers for p in layer.paths]
    assert sorted(flat) == sorted(graph.nodes)
    for layer in layers:
        assert list(layer.paths) == sorted(layer.paths)
        assert layer.size == sum(graph.nodes[p].nar_size for p in layer.paths)
        assert layer.paths


FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(channels(), st.data())
def test_partition_and_budget_for_every_budget(
    channel: tuple[ClosureGraph, Popularity], data: st.DataObject
) -> None:
    graph, pop = channel
    roots = data.draw(st.lists(st.sampled_from(sorted(graph.nodes)), min_size=1, unique=True))
    img = image(graph, roots)
    for popularity in (pop, None):
        for budget in range(1, len(img.nodes) + 2):
            layers = plan_layers(img, popularity, budget)
            check_partition(img, layers)
            assert len(layers) <= budget


@FAST
@given(channels(), st.data())
def test_deterministic_whatever_the_input_order(
    channel: tuple[ClosureGraph, Popularity], data: st.DataObject
) -> None:
    graph, pop = channel
    roots = data.draw(st.lists(st.sampled_from(sorted(graph.nodes)), min_size=1, unique=True))
    img = image(graph, roots)
    shuffled_paths = data.draw(st.permutations(sorted(img.nodes)))
    shuffled = ClosureGraph(img.roots, {p: img.nodes[p] for p in shuffled_paths})
    budget = data.draw(st.integers(1, 30))
    assert plan_layers(img, pop, budget) == plan_layers(shuffled, pop, budget)


@FAST
@given(channels(), st.data())
def test_a_path_gets_the_same_layer_in_every_image(
    channel: tuple[ClosureGraph, Popularity], data: st.DataObject
) -> None:
    """The point of the design: under the budget, a path of 100 kB or more is a layer of its
    own in every image that holds it, whatever else the image holds."""
    graph, pop = channel
    for _ in range(2):
        roots = data.draw(st.lists(st.sampled_from(sorted(graph.nodes)), min_size=1, unique=True))
        img = image(graph, roots)
        for popularity in (pop, None):
            layers = plan_layers(img, popularity, len(img.nodes))
            for layer in layers:
                big = [p for p in layer.paths if img.nodes[p].nar_size >= SMALL_LAYER]
                assert big == [] or list(layer.paths) == big == [layer.paths[0]]


@FAST
@given(channels(), st.data())
def test_over_budget_the_smallest_paths_share_a_layer(
    channel: tuple[ClosureGraph, Popularity], data: st.DataObject
) -> None:
    graph, pop = channel
    img = image(graph, sorted(graph.nodes))
    budget = data.draw(st.integers(1, max(1, len(img.nodes))))
    layers = plan_layers(img, pop, budget)
    alone = [layer for layer in layers if len(layer.paths) == 1 and layer.size >= SMALL_LAYER]
    shared = [p for layer in layers if layer not in alone for p in layer.paths]
    if alone and shared:
        assert min(layer.size for layer in alone) >= max(img.nodes[p].nar_size for p in shared)
    if len(layers) < budget:  # not pressed: the small layers hold small paths only
        assert all(img.nodes[p].nar_size < SMALL_LAYER for p in shared)


@FAST
@given(
    st.lists(st.integers(1, SMALL_LAYER - 1), min_size=1, max_size=40),
    st.integers(1, 50),
)
def test_small_layers_reach_the_minimum(sizes_list: list[int], slots: int) -> None:
    sizes = {store(f"t{i:02d}-1"): size for i, size in enumerate(sizes_list)}
    chunks = chunk_small(sorted(sizes), sizes, slots)
    assert sorted(p for chunk in chunks for p in chunk) == sorted(sizes)
    assert 1 <= len(chunks) <= slots
    if len(chunks) > 1:
        assert all(sum(sizes[p] for p in chunk) >= SMALL_LAYER for chunk in chunks)


def test_small_layers_line_up_again_after_a_difference() -> None:
    """Content-defined cuts: one more small path leaves most small layers as they were."""
    sizes = {store(f"t{i:03d}-1"): 30 * kB + 97 * i for i in range(120)}
    order = sorted(sizes)
    before = {tuple(c) for c in chunk_small(order, sizes, 1000)}
    extra = store("t000x-1")
    after = {tuple(c) for c in chunk_small(sorted([*order, extra]), {**sizes, extra: 1}, 1000)}
    assert len(before) > 20
    assert len(before - after) <= 3


def test_big_closure_plans_quickly() -> None:
    """A closure of 3000 paths (a large NixOS-like image) plans well within a second."""
    import time

    graph = random_channel_graph(seed=1, n=3000)
    start = time.perf_counter()
    layers = plan_layers(graph, parse_popularity(popcount(graph)))
    assert time.perf_counter() - start < 1.0
    check_partition(graph, layers)
    assert len(layers) <= 94


def test_baselines_on_the_worked_example() -> None:
    """The benchmark's Nixery does what the module docstring says it does."""
    file = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines_layering.py"
    spec = importlib.util.spec_from_file_location("baselines_layering", file)
    assert spec is not None and spec.loader is not None
    baselines = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baselines)
    counts = {"G-2.38": 2000, "L-1.0": 12}
    second = [
        sorted(map(store_name, layer))
        for layer in baselines.nixery_layers(example(["B-1.0"]), counts)
    ]
    assert sorted(second) == [["B-1.0", "L-1.0"], ["G-2.38"]]
    first = baselines.nixery_layers(example(), counts)
    assert sorted(sorted(map(store_name, layer)) for layer in first) == [
        ["A-1.0"],
        ["B-1.0"],
        ["C-1.0"],
        ["D-1.0"],
        ["G-2.38"],
        ["L-1.0"],
    ]
    contest = baselines.contest_layers(example(), 3)
    assert len(contest) == 2 and len(contest[-1]) == 5
