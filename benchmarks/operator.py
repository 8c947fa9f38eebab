"""Operator benchmark: 500 NixImages over 20 package sets whose builds are in storage.

Measures the time from the first ``create`` until every NixImage is Ready, and the
operator's peak memory (VmHWM of its process). The operator runs as its own process
(``python -m niximage_operator``, the real entry point) against the emulated API server of
the operator tests (tests/operator/apiserver.py) in this process; the 20 builds are made
first with the real ``niximage build`` on the offline package set.

    python benchmarks/operator.py [--images 500] [--sets 20] [--storage DIR]

Targets (the issue): all Ready in < 20 s, peak RSS < 250 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("tests/operator", "tests", "builder", "operator")]

import kmock  # noqa: E402
from apiserver import ApiServer  # noqa: E402
from operator_harness import kubeconfig_for  # noqa: E402

from niximage_builder.storage import factory  # noqa: E402

TESTPKGS = ROOT / "nix" / "testpkgs"
PACKAGES = ["bash", "jq", "coreutils", "nano", "python3", "openssl", "tzdata", "hello"]
API = "/apis/niximage.dev/v1alpha1/namespaces/default/niximages"


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "builder"), str(ROOT / "operator"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return env


def pinned_source() -> str:
    command = ["nix", "--extra-experimental-features", "nix-command", "hash", "path"]
    command += ["--type", "sha256", "--sri", str(TESTPKGS)]
    narhash = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    narhash = narhash.strip()
    return f"path:{TESTPKGS}#{narhash}"


def package_sets(count: int) -> list[list[str]]:
    combos = itertools.chain(
        itertools.combinations(PACKAGES, 1),
        itertools.combinations(PACKAGES, 2),
        itertools.combinations(PACKAGES, 3),
    )
    return [list(c) for c in itertools.islice(combos, count)]


def prebuild(sets: list[list[str]], storage: Path, source: str) -> float:
    """The builds the NixImages will find in storage (real builds, not timed below)."""
    started = time.monotonic()
    for packages in sets:
        command = [sys.executable, "-m", "niximage_builder", "build", *packages]
        command += ["--package-source", source, "--storage", str(storage)]
        subprocess.run(command, check=True, capture_output=True, env=environment())
    return time.monotonic() - started


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the operator exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the operator did not become healthy")


def ready(obj: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in obj.get("status", {}).get("conditions", ())
    )


async def run(args: argparse.Namespace, storage: Path, source: str) -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / "niximage.yaml").read_text())
    sets = package_sets(args.sets)
    server = ApiServer(keep_versions=False)
    async with server, kmock.Server(server) as http:
        server.install_crd(crd)
        server.create_namespace("default")
        kubeconfig = storage.parent / f"{storage.name}.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(str(http.url).rstrip("/"))))
        port = 18000 + os.getpid() % 1000
        env = environment() | {
            "KUBECONFIG": str(kubeconfig),
            "NIXIMAGE_OPERATOR_STORAGE": str(storage),
            "NIXIMAGE_OPERATOR_REGISTRY": "registry.bench:5000",
            "NIXIMAGE_OPERATOR_BUILDER_IMAGE": "niximage:bench",
            "NIXIMAGE_OPERATOR_DEFAULT_PACKAGE_SOURCE": source,
            "NIXIMAGE_OPERATOR_LIVENESS": f"http://127.0.0.1:{port}/healthz",
        }
        log = open(args.log, "wb")  # noqa: SIM115  (closed below, after the process)
        command = [sys.executable, "-m", "niximage_operator", *args.operator_args]
        operator = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            await asyncio.to_thread(wait_healthy, port, operator)
            idle_rss = memory_kib(operator.pid, "VmRSS")
            requests_before = len(server._requests)
            server_cpu = time.process_time()
            started = time.monotonic()
            gate = asyncio.Semaphore(32)

            async def create(index: int) -> None:
                body = {
                    "apiVersion": "niximage.dev/v1alpha1",
                    "kind": "NixImage",
                    "metadata": {"name": f"image-{index:04d}"},
                    "spec": {"packages": sets[index % len(sets)], "tag": f"t{index % 7}"},
                }
                async with gate, server.post(API, json=body) as response:
                    assert response.status == 201, await response.text()

            await asyncio.gather(*(create(i) for i in range(args.images)))
            created = time.monotonic() - started
            samples: list[int] = []
            progress: list[tuple[float, int]] = []
            while True:
                done = sum(  # the live store, not copies: this loop shares the server's CPU
                    1
                    for (_, plural, _, _), obj in server.store.items()
                    if plural == "niximages" and ready(obj)
                )
                samples.append(memory_kib(operator.pid, "VmRSS"))
                progress.append((round(time.monotonic() - started, 1), done))
                if done == args.images or time.monotonic() - started > args.timeout:
                    break
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            peak = memory_kib(operator.pid, "VmHWM")
            cpu = cpu_seconds(operator.pid)
            server_cpu = time.process_time() - server_cpu
        finally:
            operator.terminate()
            await asyncio.to_thread(operator.wait, 30)
            log.close()
            kubeconfig.unlink()
        pods = [name for plural, _, name in server.creations if plural == "pods"]
        tags = len(list(factory.open_storage(str(storage)).list("tags/default/")))
        return {
            "images": args.images,
            "package_sets": len(sets),
            "ready": done,
            "seconds_until_all_ready": round(elapsed, 2),
            "seconds_to_create": round(created, 2),
            "operator_peak_rss_mb": round(peak / 1024, 1),
            "operator_idle_rss_mb": round(idle_rss / 1024, 1),
            "operator_rss_at_end_mb": round(samples[-1] / 1024, 1),
            "operator_cpu_seconds": round(cpu, 2),
            "api_server_cpu_seconds": round(server_cpu, 2),
            "api_requests": len(server._requests) - requests_before,
            "builder_pods": len(pods),
            "tags_recorded": tags,
            "ready_over_time": progress[:: max(1, len(progress) // 12)],
            "operator_exit_code": operator.returncode,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--sets", type=int, default=20)
    parser.add_argument("--storage", help="storage dir (builds are made there if missing)")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--log", default="/dev/null", help="where the operator logs go")
    parser.add_argument("operator_args", nargs="*", help="more flags for the operator")
    args = parser.parse_args()
    source = pinned_source()
    with tempfile.TemporaryDirectory(prefix="niximage-bench-") as scratch:
        storage = Path(args.storage or scratch)
        storage.mkdir(parents=True, exist_ok=True)
        build_seconds = prebuild(package_sets(args.sets), storage, source)
        report = asyncio.run(run(args, storage, source))
    report["prebuild_seconds"] = round(build_seconds, 1)
    report["targets_met"] = (
        report["ready"] == report["tags_recorded"] == args.images
        and report["seconds_until_all_ready"] < 20
        and report["operator_peak_rss_mb"] < 250
    )
    print(json.dumps(report, indent=2))
    return 0 if report["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
