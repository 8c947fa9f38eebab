"""Warm rebuild: every layer is already in storage, so only Nix's evaluation should cost.

Builds an image once, then rebuilds it with ``--rebuild`` (the stored result is ignored,
Nix runs, every layer is found by its layer key) and reports the time spent beyond Nix.
Target (issue 3): < 2 s beyond Nix's own evaluation.

    python benchmarks/warm_rebuild.py [PKG ...] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(store: str, packages: list[str], *extra: str) -> tuple[dict, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "niximage_cli", "build", *packages, "--storage", store, *extra],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(proc.stdout), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", default=["bash", "jq", "python3"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store:
        first, cold = build(store, args.packages)
        beyond, walls = [], []
        for _ in range(args.runs):
            result, wall = build(store, args.packages, "--rebuild")
            assert result["manifestDigest"] == first["manifestDigest"]
            assert result["bytesUploaded"] == 0
            nix = result["timings"]["nixBuild"] + result["timings"]["closure"]
            beyond.append(wall - nix)
            walls.append(wall)
        cached, cached_wall = build(store, args.packages)
    print(f"packages: {' '.join(args.packages)}; {len(first['layers'])} layers")
    print(f"cold build:             {cold:6.2f} s wall")
    print(f"warm rebuild:           {statistics.median(walls):6.2f} s wall (median of {args.runs})")
    print(f"  beyond Nix:           {statistics.median(beyond):6.2f} s (target < 2 s)")
    print(f"cached result (no Nix): {cached_wall:6.2f} s wall, cached={cached['cached']}")


if __name__ == "__main__":
    main()
