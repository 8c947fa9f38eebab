"""Layer packing benchmark: ours against ``tar -cf - PATHS | gzip -6 | sha256sum``.

    python benchmarks/pack.py /nix/store/...-big /nix/store/...-python3   # real store paths
    python benchmarks/pack.py --synthetic 800                             # generated tree

The input is split into several layers (one per path, bigger paths split into their
children, then balanced by size) and packed in parallel as the builder does, in threads
(and serially, for scale). Packing in child processes instead was measured and dropped
(2 CPUs: 0.85× the threads' time at 800 MB / 43,000 entries with peak RSS 97 MB against
51 MB, equal at 22,000 entries and on a real bash+jq+python3 build).
Each run happens in a fresh interpreter whose process tree's RSS is sampled, so the
peak is the packing's own. The reference is one GNU tar piped through ``gzip -6`` and
``sha256sum`` (``tee`` to ``wc -c`` for its size). The page cache is warmed first so both
read from memory. Throughput is file bytes ÷ wall time for both. On a shared machine use
``--repeat``: the best of N runs is reported for each.

Targets (issue): throughput ≥ 8× the reference, output ≤ 1.15× its size, peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("builder", "core")]

from niximage_builder.compression import COMPRESSIONS  # noqa: E402
from niximage_builder.tarball import LayerJob, scan_paths, tar_header  # noqa: E402

MB = 1_000_000


class DiscardSink:
    """Counts bytes and drops them: the benchmark measures packing, not storage."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)


# --- input -------------------------------------------------------------------------------------

_SOURCES = ("/usr/lib", "/usr/bin", "/usr/share", "/usr/libexec", "/usr/sbin")


def _host_files() -> list[Path]:
    """Host files in a fixed pseudo-random order (by hash of the path), so any prefix of
    the list is a fair mix of ELF binaries, shared libraries, scripts, text and data."""
    found: list[Path] = []
    for top in _SOURCES:
        for directory, _dirs, files in os.walk(top):
            for name in files:
                path = Path(directory, name)
                if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
                    found.append(path)
    return sorted(found, key=lambda p: hashlib.sha256(os.fsencode(p)).digest())


def make_synthetic(target: Path, megabytes: int, packages: int = 24) -> list[str]:
    """Fill ``target/store`` with fake store paths of copied host files (deterministic).

    Files keep their place below /usr (``lib/...``, ``bin/...``, ``share/...``), and go to
    the packages in runs of 64, so package sizes vary as real ones do. Modes are the
    store's (0444/0555, directories 0555 afterwards); a few symlinks and an empty
    directory per package make the trees look like real packages.
    """
    store = target / "store"
    roots = [
        store / f"{hashlib.sha256(str(i).encode()).hexdigest()[:32]}-pkg{i}"
        for i in range(packages)
    ]
    for root in roots:
        (root / "share" / "empty").mkdir(parents=True)
    budget, written = megabytes * MB, 0
    for index, source in enumerate(_host_files()):
        if written >= budget:
            break
        size = source.stat().st_size
        if size > 64 * MB:
            continue
        destination = roots[(index // 64) % packages] / source.relative_to("/usr")
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, destination)
        except OSError:
            continue
        os.chmod(destination, 0o555 if os.access(source, os.X_OK) else 0o444)
        if index % 97 == 0:
            (destination.parent / (destination.name + ".link")).symlink_to(destination.name)
        written += size
    for directory, _dirs, _files in os.walk(store):
        os.chmod(directory, 0o555)
    os.chmod(store, 0o755)
    return [str(root) for root in roots]


def tree_size(path: str) -> int:
    return sum(e.size for e in scan_paths([path]))


def plan_layers(paths: Sequence[str], layers: int) -> list[list[str]]:
    """Split paths into ``layers`` groups of similar size, like a layering would.

    A path bigger than a fair share is replaced by its children (recursively), so one big
    store path does not serialise the run; then largest-first into the smallest group.
    """
    units = [(tree_size(p), p) for p in paths]
    total = sum(size for size, _ in units)
    share = total / layers
    for _ in range(4):
        split: list[tuple[int, str]] = []
        for size, path in units:
            if size > share and os.path.isdir(path) and not os.path.islink(path):
                children = sorted(os.path.join(path, c) for c in os.listdir(path))
                split.extend((tree_size(c), c) for c in children)
            else:
                split.append((size, path))
        units = split
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(layers)]
    for size, path in sorted(units, reverse=True):
        groups.sort(key=lambda g: g[0])
        groups[0] = (groups[0][0] + size, [*groups[0][1], path])
    return [sorted(g) for _, g in groups if g]


def warm_cache(paths: Sequence[str]) -> int:
    """Read every file once so ours and the reference both read from the page cache."""
    total = 0
    for entry in scan_paths(paths):
        if entry.kind == "file" and entry.source:
            with open(entry.source, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


# --- runs --------------------------------------------------------------------------------------


class TreeRss(threading.Thread):
    """Samples the RSS of this process plus all its descendants; keeps the peak sum."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            return 0

    @staticmethod
    def _children(pid: int) -> list[int]:
        found: list[int] = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    found.extend(int(c) for c in f.read().split())
        except OSError:
            pass
        return found

    def sample(self) -> int:
        total, pending = 0, [os.getpid()]
        while pending:
            pid = pending.pop()
            total += self._rss(pid)
            pending.extend(self._children(pid))
        self.peak = max(self.peak, total)
        return total

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.peak


def run_ours(
    groups: list[list[str]], mode: str, workers: int, compression: str, level: int | None
) -> dict[str, Any]:
    """Pack the groups (inside a fresh child interpreter: see ``_child``)."""
    sampler = TreeRss()
    sampler.start()
    before = os.times()
    start = time.perf_counter()
    jobs = [LayerJob(DiscardSink(), g, compression=compression, level=level) for g in groups]
    if mode == "serial":
        packed = [job.run() for job in jobs]
    else:  # the builder's way: a thread per layer, up to ``workers`` at once
        with ThreadPoolExecutor(workers) as pool:
            packed = list(pool.map(LayerJob.run, jobs))
    wall = time.perf_counter() - start
    after = os.times()
    cpu = sum(after[:4]) - sum(before[:4])  # user + system, ours and our children's
    return {
        "wall": wall,
        "cpu": cpu,
        "tar_bytes": sum(p.tar_size for p in packed),
        "size": sum(p.size for p in packed),
        "digests": [str(p.digest) for p in packed],
        "peak_rss": sampler.stop(),
    }


def run_reference(paths: Sequence[str]) -> dict[str, Any]:
    """``tar -cf - PATHS | gzip -6 | sha256sum`` with a ``wc -c`` on the side."""
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "fifo")
        os.mkfifo(fifo)
        relative = " ".join(f"'{p.lstrip('/')}'" for p in paths)
        script = (
            f"set -o pipefail; wc -c < {fifo} > {tmp}/size & "
            f"tar -cf - -C / {relative} | gzip -6 | tee {fifo} | sha256sum > {tmp}/sum; wait"
        )
        before = os.times()
        start = time.perf_counter()
        subprocess.run(["bash", "-c", script], check=True)
        wall = time.perf_counter() - start
        after = os.times()
        size = int(Path(tmp, "size").read_text())
    return {"wall": wall, "cpu": sum(after[2:4]) - sum(before[2:4]), "size": size}


def header_speed(paths: Sequence[str]) -> dict[str, float]:
    """Headers per second: ours against Python's tarfile (TarInfo.tobuf, PAX format)."""
    entries = scan_paths(paths)
    start = time.perf_counter()
    for entry in entries:
        tar_header(entry)
    ours = time.perf_counter() - start
    kinds = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE}
    infos = []
    for entry in entries:
        info = tarfile.TarInfo(entry.name)
        info.type = kinds[entry.kind]
        info.mode, info.size, info.linkname, info.mtime = entry.mode, entry.size, entry.target, 1
        infos.append(info)
    start = time.perf_counter()
    for info in infos:
        info.tobuf(tarfile.PAX_FORMAT)
    theirs = time.perf_counter() - start
    return {
        "entries": len(entries),
        "ours_per_s": len(entries) / ours,
        "tarfile_per_s": len(entries) / theirs,
    }


def _child(mode: str, args: argparse.Namespace, groups: list[list[str]]) -> dict[str, Any]:
    """Run one mode in a fresh interpreter so its memory is not the parent's."""
    spec = {"mode": mode, "groups": groups, "workers": args.workers}
    spec |= {"compression": args.compression, "level": args.level}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _remove(path: Path) -> None:
    """rmtree that first makes the store-like 0555 directories writable again."""
    for directory, _dirs, _files in os.walk(path):
        os.chmod(directory, 0o755)
    shutil.rmtree(path, ignore_errors=True)


# --- main --------------------------------------------------------------------------------------


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, with the median wall time and the largest peak RSS of all runs."""
    walls = [float(r["wall"]) for r in runs]
    best = dict(min(runs, key=lambda r: float(r["wall"])))
    best["median_wall"] = statistics.median(walls)
    if "peak_rss" in best:
        best["peak_rss"] = max(int(r["peak_rss"]) for r in runs)
    best.pop("digests", None)
    return best


def report(
    input_bytes: int,
    layers: int,
    results: dict[str, dict[str, Any]],
    headers: dict[str, float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Print the figures; return them for --json."""
    level = args.level if args.level is not None else "default"
    print(
        f"input: {input_bytes / MB:.0f} MB of files, {headers['entries']:.0f} entries, "
        f"{layers} layers, {args.workers} workers, {os.cpu_count()} CPUs, "
        f"{args.compression} level {level}, best of {args.repeat}, "
        f"load average now {os.getloadavg()[0]:.1f}"
    )
    print(
        f"tar headers/s: ours {headers['ours_per_s']:,.0f}, tarfile {headers['tarfile_per_s']:,.0f}"
    )
    summary: dict[str, Any] = {
        "input_bytes": input_bytes,
        "layers": layers,
        "workers": args.workers,
        "headers": headers,
    }
    reference = results.get("reference")
    for name, result in results.items():
        wall, cpu, size = float(result["wall"]), float(result["cpu"]), int(result["size"])
        result["mb_s"] = input_bytes / MB / wall
        line = (
            f"{name:>9}: {wall:6.2f} s (median {float(result['median_wall']):.2f}), "
            f"{result['mb_s']:6.1f} MB/s, cpu {cpu:5.1f} s, {size / MB:6.1f} MB"
        )
        if "peak_rss" in result:
            line += f", peak RSS {int(result['peak_rss']) / MB:.0f} MB"
        if reference and name != "reference":
            result["throughput_ratio"] = float(reference["wall"]) / wall
            result["size_ratio"] = size / int(reference["size"])
            result["cpu_ratio"] = float(reference["cpu"]) / cpu  # load-independent
            line += (
                f" | ×{result['throughput_ratio']:.1f} throughput, ×{result['size_ratio']:.3f}"
                f" size, ×{result['cpu_ratio']:.1f} less CPU"
            )
        print(line)
        summary[name] = result
    return summary


def _inputs(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[list[str], Path | None]:
    """The paths to pack and the temporary directory to remove afterwards, if any."""
    paths = [os.path.abspath(p) for p in args.paths]
    tmp = None
    if args.synthetic:
        base = Path(args.keep) if args.keep else Path(tmp := tempfile.mkdtemp(prefix="packbench-"))
        if not (base / "store").exists():
            make_synthetic(base, args.synthetic)
        paths += sorted(str(p) for p in (base / "store").iterdir())
    if not paths:
        parser.error("give store paths or --synthetic MB")
    return paths, Path(tmp) if tmp else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("paths", nargs="*", help="absolute store paths or directories")
    parser.add_argument("--synthetic", type=int, metavar="MB", help="generate MB of input")
    parser.add_argument("--keep", metavar="DIR", help="generate the synthetic tree here, keep it")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--layers", type=int, default=8, help="split the input into N layers")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="gzip")
    parser.add_argument("--level", type=int, default=None)
    parser.add_argument(
        "--modes",
        default="threads,serial",
        help="comma list of threads, serial",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; best is reported")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        result = run_ours(
            spec["groups"], spec["mode"], spec["workers"], spec["compression"], spec["level"]
        )
        print(json.dumps(result))
        return 0

    paths, tmp = _inputs(args, parser)
    try:
        groups = plan_layers(paths, args.layers)
        input_bytes = warm_cache(paths)
        headers = header_speed(paths)
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeat):
            for mode in args.modes.split(","):
                runs.setdefault(mode, []).append(_child(mode, args, groups))
            if not args.no_reference:
                runs.setdefault("reference", []).append(run_reference(paths))
        digests = {tuple(r["digests"]) for m, rs in runs.items() if m != "reference" for r in rs}
        if len(digests) != 1:
            print("ERROR: runs produced different layers", file=sys.stderr)
            return 1
        results = {mode: _best(mode_runs) for mode, mode_runs in runs.items()}
        summary = report(input_bytes, len(groups), results, headers, args)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        if tmp:
            _remove(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
