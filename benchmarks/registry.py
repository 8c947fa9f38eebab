"""Registry benchmark: ``niximage serve`` against Debian's docker-registry, same run, loopback.

    python3 benchmarks/registry.py [--runs 5] [--duration 20] [--blob-mb 200] [--workers 2]

1. Blob GET throughput: one ``--blob-mb`` MB blob with curl, servers alternating, ``--runs``
   times each; median MB/s and the ratio ours / docker-registry (target ≥ 1.0).
2. Manifest GET by tag: ``wrk`` with 64 connections for ``--duration`` s, alternating;
   median requests/s, ratio, p99 latency, server RSS after the run (all worker processes).
3. On-demand (needs Nix): twenty concurrent first pulls of one new image → builds counted
   from ``/metrics`` (expected: exactly 1).

Both servers log every request to a file (docker-registry at level info, ours JSON lines)
and read the same bytes from the page cache. Client and servers share the machine's cores,
so absolute numbers depend on the machine; the ratios are the point.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import registry_servers as rs

OCI = "application/vnd.oci.image.manifest.v1+json"


def blob_throughput(servers: list[rs.Server], digest: str, runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {s.name: [] for s in servers}
    for run in range(runs):
        order = servers if run % 2 == 0 else servers[::-1]
        for server in order:
            url = f"http://{server.address}/v2/bench/image/blobs/{digest}"
            results[server.name].append(rs.curl_mb_per_s(url))
    return results


def manifest_load(
    servers: list[rs.Server], runs: int, seconds: int, connections: int, threads: int
) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    for run in range(runs):
        order = servers if run % 2 == 0 else servers[::-1]
        for server in order:
            url = f"http://{server.address}/v2/bench/image/manifests/latest"
            measured = rs.wrk(url, seconds, connections, threads, OCI)
            measured["rss_mb"] = server.rss_mb()
            results[server.name].append(measured)
    return results


def on_demand(work: Path, pulls: int) -> dict[str, Any]:
    if shutil.which("nix-build") is None:
        return {"skipped": "Nix is not installed"}
    server = rs.start_ours(work / "ondemand-store", work, ["--on-demand", "--no-access-log"])
    try:
        url = f"http://{server.address}/v2/bash/jq/manifests/latest"
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(pulls) as pool:
            answers = list(pool.map(lambda _: rs.get_json_status(url, OCI), range(pulls)))
        elapsed = time.monotonic() - started
        builds = rs.metrics_value(server.address, 'niximage_registry_builds_total{result="ok"')
        return {
            "pulls": pulls,
            "ok": sum(1 for status, _ in answers if status == 200),
            "digests": len({digest for status, digest in answers if status == 200}),
            "builds": builds,
            "seconds": round(elapsed, 2),
        }
    finally:
        server.stop()


def summary(
    blobs: dict[str, list[float]], manifests: dict[str, list[dict[str, float]]]
) -> dict[str, Any]:
    ours, theirs = "niximage", "docker-registry"
    blob = {name: statistics.median(values) for name, values in blobs.items()}
    rps = {name: statistics.median(r["rps"] for r in runs) for name, runs in manifests.items()}
    p99 = {name: statistics.median(r["p99_ms"] for r in runs) for name, runs in manifests.items()}
    rss = {name: max(r["rss_mb"] for r in runs) for name, runs in manifests.items()}
    errors = {name: sum(r["non_2xx"] for r in runs) for name, runs in manifests.items()}
    return {
        "blob_mb_per_s": blob,
        "blob_ratio": round(blob[ours] / blob[theirs], 2),
        "manifest_rps": rps,
        "manifest_ratio": round(rps[ours] / rps[theirs], 2),
        "manifest_p99_ms": p99,
        "rss_mb": rss,
        "manifest_non_2xx": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="blob downloads per server")
    parser.add_argument("--manifest-runs", type=int, default=3, help="wrk runs per server")
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--blob-mb", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="niximage serve --workers")
    parser.add_argument("--pulls", type=int, default=20, help="concurrent on-demand pulls")
    parser.add_argument("--skip-on-demand", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    for tool in ("curl", "wrk", "skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (scripts/install.sh)")

    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        work = Path(tmp)
        manifest_digest, big = rs.write_image(work / "store", args.blob_mb)
        ours = rs.start_ours(work / "store", work, ["--workers", str(args.workers)])
        theirs = rs.start_docker_registry(work)
        servers = [ours, theirs]
        try:
            rs.copy_image(
                f"{ours.address}/bench/image:latest", f"{theirs.address}/bench/image:latest"
            )
            for server in servers:  # warm the page cache and both servers' caches
                rs.curl_mb_per_s(f"http://{server.address}/v2/bench/image/blobs/{big}")
            blobs = blob_throughput(servers, str(big), args.runs)
            manifests = manifest_load(
                servers, args.manifest_runs, args.duration, args.connections, args.threads
            )
        finally:
            for server in servers:
                server.stop()
        result = summary(blobs, manifests)
        result["raw"] = {"blobs": blobs, "manifests": manifests}
        result["settings"] = vars(args) | {"manifest": str(manifest_digest)}
        if not args.skip_on_demand:
            result["on_demand"] = on_demand(work, args.pulls)

    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
