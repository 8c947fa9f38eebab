"""Operator benchmark: 500 NixImages over 20 package sets whose builds are in storage.

Measures the time from the first ``create`` until every NixImage is Ready, and the
operator's peak memory (VmHWM of its process). The operator runs as its own process
(``python -m niximage_operator``, the real entry point) against, in the same run, the
emulated API server of the operator tests (tests/operator/apiserver.py, in this process)
and a real kube-apiserver with etcd (tests/kubesupport/controlplane.py, ``../shared/kube``);
the 20 builds are made first with the real ``niximage build`` on the offline package set.

    python benchmarks/operator.py [--images 500] [--sets 20] [--api emulator|real|both]

Targets: all Ready in < 10 s on the real API server (< 20 s on the emulator), peak RSS
< 250 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT / p) for p in ("tests/operator", "tests", "core", "builder", "registry", "operator")
]

import aiohttp  # noqa: E402
import kmock  # noqa: E402
from apiserver import ApiServer  # noqa: E402
from operator_harness import kubeconfig_for  # noqa: E402

from kubesupport import controlplane  # noqa: E402
from niximage_core.storage import factory  # noqa: E402

TESTPKGS = ROOT / "nix" / "testpkgs"
SOURCE_ROOTS = ("core", "builder", "registry", "operator", "cli")
PACKAGES = ["bash", "jq", "coreutils", "nano", "python3", "openssl", "tzdata", "hello"]
API = "/apis/niximage.dev/v1alpha1/namespaces/default/niximages"


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*(str(ROOT / root) for root in SOURCE_ROOTS), env.get("PYTHONPATH", "")]
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
        command = [sys.executable, "-m", "niximage_cli", "build", *packages]
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


class Emulated:
    """The emulated API server, in this process."""

    name = "emulator"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server = ApiServer(keep_versions=False)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        crd = yaml.safe_load((ROOT / "crds" / "niximage.yaml").read_text())
        async with self.server, kmock.Server(self.server) as http:
            self.server.install_crd(crd)
            self.server.create_namespace("default")
            self.kubeconfig = self.workdir / "emulator.kubeconfig"
            self.kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(str(http.url).rstrip("/"))))
            yield self

    async def create(self, body: dict[str, Any]) -> None:
        async with self.server.post(API, json=body) as response:
            assert response.status == 201, await response.text()

    async def count_ready(self) -> int:
        return sum(  # the live store, not copies: this loop shares the server's CPU
            1
            for (_, plural, _, _), obj in self.server.store.items()
            if plural == "niximages" and ready(obj)
        )

    def requests(self) -> int:
        return len(self.server._requests)


class Real:
    """kube-apiserver, etcd and kube-controller-manager on loopback."""

    name = "real"

    def __init__(self, workdir: Path) -> None:
        # Audit logging in batches, as production API servers log: blocking mode (what the
        # RBAC tests need) costs the server a synchronous write per request.
        self.plane = controlplane.ControlPlane(workdir / "control-plane", audit_mode="batch")
        self.plane.workdir.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        await asyncio.to_thread(self.plane.start)
        try:
            connector = aiohttp.TCPConnector(ssl=self.plane.ssl_context(), limit=64)
            async with aiohttp.ClientSession(self.plane.url, connector=connector) as session:
                self.session = session
                crd = yaml.safe_load((ROOT / "crds" / "niximage.yaml").read_text())
                path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
                async with session.post(path, json=crd) as response:
                    assert response.status == 201, await response.text()
                while True:  # until the new resource is served
                    async with session.get(API) as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.2)
                self.kubeconfig = self.plane.admin_kubeconfig
                yield self
        finally:
            await asyncio.to_thread(self.plane.stop)

    async def create(self, body: dict[str, Any]) -> None:
        async with self.session.post(API, json=body) as response:
            assert response.status == 201, await response.text()

    async def count_ready(self) -> int:
        async with self.session.get(API) as response:
            items = (await response.json())["items"]
        return sum(1 for obj in items if ready(obj))

    def requests(self) -> int:
        return sum(1 for _ in self.plane.audit_events())


async def run(
    args: argparse.Namespace, api: Emulated | Real, storage: Path, source: str
) -> dict[str, Any]:
    sets = package_sets(args.sets)
    async with api.running():
        port = 18000 + os.getpid() % 1000
        env = environment() | {
            "KUBECONFIG": str(api.kubeconfig),
            "NIXIMAGE_OPERATOR_STORAGE": str(storage),
            "NIXIMAGE_OPERATOR_REGISTRY": "registry.bench:5000",
            "NIXIMAGE_OPERATOR_BUILDER_IMAGE": "niximage:bench",
            "NIXIMAGE_OPERATOR_DEFAULT_PACKAGE_SOURCE": source,
            "NIXIMAGE_OPERATOR_LIVENESS": f"http://127.0.0.1:{port}/healthz",
        }
        log = open(args.log, "ab")  # noqa: SIM115  (closed below, after the process)
        command = [sys.executable, "-m", "niximage_operator", *args.operator_args]
        operator = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            await asyncio.to_thread(wait_healthy, port, operator)
            idle_rss = memory_kib(operator.pid, "VmRSS")
            requests_before = api.requests()
            started = time.monotonic()
            gate = asyncio.Semaphore(32)

            async def create(index: int) -> None:
                body = {
                    "apiVersion": "niximage.dev/v1alpha1",
                    "kind": "NixImage",
                    "metadata": {"name": f"image-{index:04d}"},
                    "spec": {"packages": sets[index % len(sets)], "tag": f"t{index % 7}"},
                }
                async with gate:
                    await api.create(body)

            await asyncio.gather(*(create(i) for i in range(args.images)))
            created = time.monotonic() - started
            samples: list[int] = []
            progress: list[tuple[float, int]] = []
            while True:
                done = await api.count_ready()
                samples.append(memory_kib(operator.pid, "VmRSS"))
                progress.append((round(time.monotonic() - started, 1), done))
                if done == args.images or time.monotonic() - started > args.timeout:
                    break
                await asyncio.sleep(0.05 if isinstance(api, Emulated) else 0.25)
            elapsed = time.monotonic() - started
            peak = memory_kib(operator.pid, "VmHWM")
            cpu = cpu_seconds(operator.pid)
        finally:
            operator.terminate()
            await asyncio.to_thread(operator.wait, 30)
            log.close()
        tags = len(list(factory.open_storage(str(storage)).list("tags/default/")))
        return {
            "api": api.name,
            "images": args.images,
            "package_sets": len(sets),
            "ready": done,
            "seconds_until_all_ready": round(elapsed, 2),
            "seconds_to_create": round(created, 2),
            "operator_peak_rss_mb": round(peak / 1024, 1),
            "operator_idle_rss_mb": round(idle_rss / 1024, 1),
            "operator_rss_at_end_mb": round(samples[-1] / 1024, 1),
            "operator_cpu_seconds": round(cpu, 2),
            "api_requests": api.requests() - requests_before,
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
    parser.add_argument("--api", choices=["emulator", "real", "both"], default="both")
    parser.add_argument("operator_args", nargs="*", help="more flags for the operator")
    args = parser.parse_args()
    source = pinned_source()
    apis = {"emulator": [Emulated], "real": [Real], "both": [Emulated, Real]}[args.api]
    reports = []
    with tempfile.TemporaryDirectory(prefix="niximage-bench-") as scratch:
        build_seconds = prebuild(package_sets(args.sets), Path(scratch) / "builds", source)
        for kind in apis:
            # A storage of its own per run (the builds copied in): tags start empty.
            storage = Path(args.storage or scratch) / f"storage-{kind.name}"
            shutil.copytree(Path(scratch) / "builds", storage, symlinks=True)
            report = asyncio.run(run(args, kind(Path(scratch)), storage, source))
            limit = 10 if kind is Real else 20
            report["targets_met"] = (
                report["ready"] == report["tags_recorded"] == args.images
                and report["seconds_until_all_ready"] < limit
                and report["operator_peak_rss_mb"] < 250
            )
            reports.append(report)
    print(json.dumps({"prebuild_seconds": round(build_seconds, 1), "runs": reports}, indent=2))
    return 0 if all(r["targets_met"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
