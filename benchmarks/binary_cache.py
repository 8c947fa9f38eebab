"""Builds from a binary cache into an empty Nix store: ours against full realisation.

A real cache (the offline set's python3 closure, ``nix copy``, signed, zstd, served over
HTTP on loopback); every build starts with a fresh tmpfs over /nix. Two cases:

- *all stored*: storage holds every layer of the image (a rebuild from an empty store);
- *one-application bump*: python3 changed in the package set; storage holds the old
  image's layers.

For each: seconds and bytes served by the cache, for ``niximage build`` and for what any
builder that realises the closure does (``nix-store --realise`` of the image's paths with
the same cache; Nixery and dockerTools builders do this), and the changed paths' NAR bytes.
Ratios are ours ÷ realisation in the same run.

    python3 benchmarks/binary_cache.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "core"), str(ROOT / "builder")]

from tests.binarycache.cachesupport import (  # noqa: E402
    Key,
    build_json,
    bumped_package_set,
    closure_paths,
    copy_to_cache,
    empty_store_niximage,
    in_empty_store,
    nar_sizes,
    serve,
)
from testsupport import niximage_json  # noqa: E402

PACKAGE = "python3"


def realise(result: dict[str, Any], url: str, key: Key) -> None:
    """What a builder that realises does: evaluate and realise the image's packages
    (``nix-build`` of prepare-image.nix, as ``niximage`` without caches), substituting
    every path of the closure from the cache."""
    spec = result["spec"]
    source = {k: v for k, v in spec["source"].items() if k != "type"}
    proc = in_empty_store(
        "nix-build", str(ROOT / "nix" / "prepare-image.nix"), "-A", "contents", "--no-out-link",
        "--argstr", "packages", json.dumps(spec["packages"]),
        "--argstr", "srcType", spec["source"]["type"], "--argstr", "srcArgs", json.dumps(source),
        "--option", "substituters", url, "--option", "trusted-public-keys", key.public,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"nix-build failed: {proc.stderr[-2000:]}")


def timed(server: Any, run: Any) -> tuple[float, int, Any]:
    since = len(server.requests)
    started = time.perf_counter()
    value = run()
    return time.perf_counter() - started, server.served_nar_bytes(since), value


def ours_build(storage: Path, cache: list[str], flags: list[str]) -> dict[str, Any]:
    return build_json(
        empty_store_niximage("build", PACKAGE, "--storage", str(storage), *cache, *flags)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="niximage-bench-cache-"))
    warm = work / "warm"
    old = niximage_json("build", PACKAGE, "--storage", str(warm))
    bumped = bumped_package_set(work / "bumped", PACKAGE)
    new = niximage_json("build", PACKAGE, "--storage", str(warm), "--package-source",
                        f"path:{bumped}")  # fmt: skip
    key = Key(work)
    old_paths, new_paths = sorted(closure_paths(old)), sorted(closure_paths(new))
    copy_to_cache(work / "cache", sorted({*old_paths, *new_paths}), "zstd", key)
    changed = sorted(set(new_paths) - set(old_paths))
    changed_nar = sum(nar_sizes(changed).values())
    rows: dict[str, dict[str, list[float]]] = {}
    bump = ["--package-source", f"path:{bumped}"]
    with serve(work / "cache") as server:
        cache = ["--substituter", server.url, "--trusted-public-key", key.public]
        for round_ in range(args.repeat):
            storage = work / f"storage-{round_}"
            build_json(empty_store_niximage("build", PACKAGE, "--storage", str(storage), *cache))
            cases = {"all stored": (["--rebuild"], old), "one-application bump": (bump, new)}
            for name, (flags, image) in cases.items():
                ours = timed(server, functools.partial(ours_build, storage, cache, flags))
                theirs = timed(server, functools.partial(realise, image, server.url, key))
                assert ours[2]["bytesDownloaded"] == ours[1], "builder and server disagree"
                row = rows.setdefault(name, {})
                figures = {"ours s": ours[0], "ours B": ours[1], "ours NAR B": 0.0}
                figures["ours NAR B"] = ours[2]["narBytesDownloaded"]
                figures.update({"realise s": theirs[0], "realise B": theirs[1]})
                for label, value in figures.items():
                    row.setdefault(label, []).append(value)
    report = {"changedPaths": changed, "changedNarBytes": changed_nar, "cases": {}}
    print(f"{PACKAGE}: closure {len(new_paths)} paths; changed by the bump: "
          f"{len(changed)} path(s), {changed_nar} NAR bytes")  # fmt: skip
    print(f"{'case':<22} {'ours s':>8} {'realise s':>10} {'time':>7} {'ours bytes':>11} "
          f"{'realise bytes':>14} {'ours NAR/changed':>17}")  # fmt: skip
    for name, row in rows.items():
        med = {label: statistics.median(values) for label, values in row.items()}
        per_changed = med["ours NAR B"] / changed_nar if name != "all stored" else 0.0
        print(f"{name:<22} {med['ours s']:>8.2f} {med['realise s']:>10.2f} "
              f"{med['ours s'] / med['realise s']:>6.2f}x {med['ours B']:>11.0f} "
              f"{med['realise B']:>14.0f} {per_changed:>16.3f}x")  # fmt: skip
        report["cases"][name] = med
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
