"""Registry benchmark: ``niximage serve`` against Debian's docker-registry, same run, loopback.

    python3 benchmarks/registry.py [--only SECTION...] [--skip SECTION...] [--runs 5]
        [--duration 20] [--blob-mb 200] [--clients 64] [--workers 2] [--gcs-streams 200]

Sections (all by default; about 4 minutes on 2 cores), with issue 13's targets:

- ``blob``: one ``--blob-mb`` MB blob with curl, servers alternating, ``--runs`` times each;
  median MB/s and the ratio ours / docker-registry (target ≥ 1.5).
- ``concurrent``: the same blob fetched by ``--clients`` clients at once
  (``registry_servers.parallel_get``: one connection each, bodies discarded by the kernel
  so that the client costs next to nothing), ``--concurrent-runs`` times, alternating;
  median aggregate MB/s and the ratio (target ≥ 1.3).
- ``manifest``: manifest GET by tag, ``wrk`` with ``--connections`` connections for
  ``--duration`` s, ``--manifest-runs`` times, alternating among docker-registry, ours and
  ours with the tag cache off (``--tag-cache-ttl 0``: every request reads the tag from
  storage); median requests/s, ratios (target ≥ 5 with the cache off), p99 latency,
  server RSS after the run (all worker processes).
- ``gcs``: ours over fake-gcs-server with ``--no-redirect`` (the registry streams the blob
  itself), ``--gcs-streams`` concurrent full GETs of one ``--gcs-blob-mb`` MB blob;
  the registry's RSS (sum over its processes, the forking parent included) sampled every
  0.1 s during the run, and after it (target: peak < 300 MB). The sum counts the pages a
  fork shares once per process: PSS, which does not, is given too. No docker-registry
  here: it has no GCS emulator path.
- ``on-demand`` (needs Nix): twenty concurrent first pulls of one new image → builds
  counted from ``/metrics`` (expected: exactly 1).

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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import registry_servers as rs

from niximage_core.digest import Digest
from niximage_core.storage.filesystem import FilesystemStorage
from niximage_core.storage.gcs import GcsStorage
from tests.storage.gcs_emulator import GcsEmulator

OCI = "application/vnd.oci.image.manifest.v1+json"
SECTIONS = ("blob", "concurrent", "manifest", "gcs", "on-demand")
OURS, NO_TAG_CACHE, THEIRS = "niximage", "niximage-no-tag-cache", "docker-registry"
TARGETS = {"blob": 1.5, "concurrent": 1.3, "manifest": 5.0, "gcs_peak_rss_mb": 300.0}


def blob_url(server: rs.Server, digest: Digest) -> str:
    return f"http://{server.address}/v2/bench/image/blobs/{digest}"


def blob_throughput(servers: list[rs.Server], digest: Digest, runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {s.name: [] for s in servers}
    for run in range(runs):
        for server in rs.rotated(servers, run):
            results[server.name].append(rs.curl_mb_per_s(blob_url(server, digest)))
    return results


def concurrent_throughput(
    servers: list[rs.Server], digest: Digest, size: int, runs: int, clients: int
) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    for run in range(runs):
        for server in rs.rotated(servers, run):
            measured = rs.parallel_get(blob_url(server, digest), clients, size)
            measured["rss_mb"] = server.rss_mb()
            results[server.name].append(measured)
    return results


def manifest_load(
    servers: list[rs.Server], runs: int, seconds: int, connections: int, threads: int
) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    for run in range(runs):
        for server in rs.rotated(servers, run):
            url = f"http://{server.address}/v2/bench/image/manifests/latest"
            measured = rs.wrk(url, seconds, connections, threads, OCI)
            measured["rss_mb"] = server.rss_mb()
            results[server.name].append(measured)
    return results


def gcs_streams(work: Path, streams: int, blob_mb: int, workers: int) -> dict[str, Any]:
    """``streams`` concurrent GETs of one blob that ours streams from fake-gcs-server."""
    with GcsEmulator() as emulator:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        emulator.create_bucket(bucket)
        client = emulator.client()
        try:
            _, big = rs.write_image(GcsStorage(bucket, "registry", client), blob_mb)
        finally:
            client.close()
        environment = {"STORAGE_EMULATOR_HOST": emulator.url, "GOOGLE_CLOUD_PROJECT": "test"}
        server = rs.start_ours(
            f"gs://{bucket}/registry",
            work,
            ["--workers", str(workers), "--no-redirect"],
            name="niximage-gcs",
            env=environment,
        )
        try:
            size = blob_mb * 1_000_000
            url = blob_url(server, big)
            rs.parallel_get(url, workers * 2, size)  # warm: imports, pools, first allocations
            baseline = server.rss_mb()
            with rs.RssSampler(server) as sampler:
                measured = rs.parallel_get(url, streams, size)
            time.sleep(2)
            peaks = server.memory_mb("VmHWM")
            return {
                "streams": streams,
                "blob_mb": blob_mb,
                "workers": workers,
                "mb_per_s": round(measured["mb_per_s"], 1),
                "seconds": round(measured["seconds"], 2),
                "fastest_s": round(measured["fastest_s"], 2),
                "rss_baseline_mb": round(baseline, 1),
                "rss_peak_mb": round(sampler.peak_rss_mb, 1),
                "pss_peak_mb": round(sampler.peak_pss_mb, 1),
                "rss_after_mb": round(server.rss_mb(), 1),
                "vmhwm_per_process_mb": [round(peaks[pid], 1) for pid in sorted(peaks)],
            }
        finally:
            server.stop()


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


def ratio(values: dict[str, float], ours: str, target: float) -> dict[str, Any]:
    found = values[ours] / values[THEIRS]
    return {"ratio": round(found, 2), "target": target, "met": found >= target}


def per_server(
    runs: dict[str, list[dict[str, float]]],
    field: str,
    combine: Callable[[list[float]], float] = statistics.median,
) -> dict[str, float]:
    """Each server's ``field`` over its runs: the median, unless told otherwise."""
    return {name: round(combine([r[field] for r in each]), 1) for name, each in runs.items()}


def blob_summary(blobs: dict[str, list[float]]) -> dict[str, Any]:
    mb_per_s = {name: round(statistics.median(values), 1) for name, values in blobs.items()}
    return {"mb_per_s": mb_per_s, **ratio(mb_per_s, OURS, TARGETS["blob"])}


def concurrent_summary(runs: dict[str, list[dict[str, float]]], clients: int) -> dict[str, Any]:
    mb_per_s = per_server(runs, "mb_per_s")
    return {
        "clients": clients,
        "aggregate_mb_per_s": mb_per_s,
        **ratio(mb_per_s, OURS, TARGETS["concurrent"]),
        "slowest_client_s": per_server(runs, "slowest_s"),
        "rss_mb": per_server(runs, "rss_mb", max),
    }


def manifest_summary(runs: dict[str, list[dict[str, float]]], connections: int) -> dict[str, Any]:
    rps = per_server(runs, "rps")
    return {
        "connections": connections,
        "rps": rps,
        "tag_cache_off": ratio(rps, NO_TAG_CACHE, TARGETS["manifest"]),
        "tag_cache_on": ratio(rps, OURS, TARGETS["manifest"]),
        "p99_ms": per_server(runs, "p99_ms"),
        "rss_mb": per_server(runs, "rss_mb", max),
        "non_2xx": per_server(runs, "non_2xx", sum),
    }


def loopback_sections(args: argparse.Namespace, work: Path, sections: set[str]) -> dict[str, Any]:
    """``blob``, ``concurrent`` and ``manifest``: ours and docker-registry, same image."""
    _, big = rs.write_image(FilesystemStorage(work / "store"), args.blob_mb)
    size = args.blob_mb * 1_000_000
    ours = rs.start_ours(work / "store", work, ["--workers", str(args.workers)])
    servers = [ours, rs.start_docker_registry(work)]
    if "manifest" in sections:
        extra = ["--workers", str(args.workers), "--tag-cache-ttl", "0"]
        servers.append(rs.start_ours(work / "store", work, extra, name=NO_TAG_CACHE))
    result: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    try:
        image = "bench/image:latest"
        rs.copy_image(f"{ours.address}/{image}", f"{servers[1].address}/{image}")
        blob_servers = servers[:2]
        for server in blob_servers:  # warm the page cache and both servers' caches
            rs.curl_mb_per_s(blob_url(server, big))
        if "blob" in sections:
            raw["blob"] = blob_throughput(blob_servers, big, args.runs)
            result["blob"] = blob_summary(raw["blob"])
        if "concurrent" in sections:
            raw["concurrent"] = concurrent_throughput(
                blob_servers, big, size, args.concurrent_runs, args.clients
            )
            result["concurrent"] = concurrent_summary(raw["concurrent"], args.clients)
        if "manifest" in sections:
            raw["manifest"] = manifest_load(
                servers, args.manifest_runs, args.duration, args.connections, args.threads
            )
            result["manifest"] = manifest_summary(raw["manifest"], args.connections)
    finally:
        for server in servers:
            server.stop()
    result["raw"] = raw
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[])
    parser.add_argument("--runs", type=int, default=5, help="single-client blob downloads")
    parser.add_argument("--concurrent-runs", type=int, default=3, help="concurrent rounds")
    parser.add_argument("--clients", type=int, default=64, help="concurrent blob clients")
    parser.add_argument("--manifest-runs", type=int, default=3, help="wrk runs per server")
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--blob-mb", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="niximage serve --workers")
    parser.add_argument("--gcs-streams", type=int, default=200, help="concurrent GCS streams")
    parser.add_argument("--gcs-blob-mb", type=int, default=25)
    parser.add_argument("--pulls", type=int, default=20, help="concurrent on-demand pulls")
    parser.add_argument("--json", help="also write the results (and every run's figures) here")
    args = parser.parse_args()
    sections = set(args.only) - set(args.skip)
    loopback = sections & {"blob", "concurrent", "manifest"}
    tools = ("curl", "wrk", "skopeo", "docker-registry") if loopback else ()
    for tool in tools:
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (scripts/install.sh)")

    result: dict[str, Any] = {"raw": {}}
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        work = Path(tmp)
        if loopback:
            result.update(loopback_sections(args, work, loopback))
        if "gcs" in sections:
            result["gcs"] = gcs_streams(work, args.gcs_streams, args.gcs_blob_mb, args.workers)
            result["gcs"] |= {
                "target_peak_mb": TARGETS["gcs_peak_rss_mb"],
                "met": result["gcs"]["rss_peak_mb"] < TARGETS["gcs_peak_rss_mb"],
            }
        if "on-demand" in sections:
            result["on_demand"] = on_demand(work, args.pulls)
    result["settings"] = vars(args)

    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
