"""Layer packing benchmark: ours against ``tar -cf - PATHS | gzip -6 | sha256sum``.

    python benchmarks/pack.py /nix/store/...-big /nix/store/...-python3   # real store paths
    python benchmarks/pack.py --synthetic 800                             # generated tree

The input is split into several layers (one per path, bigger paths split into their
children, then balanced by size), packed in parallel as the builder does, with threads
and with processes, each run in a fresh child process so its peak RSS is its own. The
reference is one GNU tar piped through ``gzip -6`` and ``sha256sum`` (``tee`` to a
``wc -c`` for its size). The page cache is warmed first so both read from memory.

Targets (issue): throughput ≥ 8× the reference, output ≤ 1.15× its size, peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "builder"))

from niximage_builder.compression import COMPRESSIONS  # noqa: E402
from niximage_builder.tarball import (  # noqa: E402
    LayerJob,
    PackedLayer,
    pack_layers_parallel,
    pack_paths,
    scan_paths,
    tar_header,
)

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
    roots = [store / f"{hashlib.sha256(str(i).encode()).hexdigest()[:32]}-pkg{i}"
             for i in range(packages)]
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


def _pack_one(paths: Sequence[str], compression: str, level: int | None) -> PackedLayer:
    return pack_paths(paths, DiscardSink(), compression, level)  # type: ignore[arg-type]


def run_ours(groups: list[list[str]], mode: str, workers: int, compression: str,
             level: int | None) -> dict[str, object]:
    """Pack the groups; runs inside a fresh child so ru_maxrss is this run's peak."""
    start = time.perf_counter()
    if mode == "processes":
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_pack_one, g, compression, level) for g in groups]
            packed = [f.result() for f in futures]
    else:
        jobs = [LayerJob(DiscardSink(), g, compression=compression, level=level)  # type: ignore[arg-type]
                for g in groups]
        packed = pack_layers_parallel(jobs, workers if mode == "threads" else 1)
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "tar_bytes": sum(p.tar_size for p in packed),
        "size": sum(p.size for p in packed),
        "digests": [str(p.digest) for p in packed],
        "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "maxrss_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def run_reference(paths: Sequence[str]) -> dict[str, object]:
    """``tar -cf - PATHS | gzip -6 | sha256sum`` with a ``wc -c`` on the side."""
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "fifo")
        os.mkfifo(fifo)
        relative = " ".join(f"'{p.lstrip('/')}'" for p in paths)
        script = (f"set -o pipefail; wc -c < {fifo} > {tmp}/size & "
                  f"tar -cf - -C / {relative} | gzip -6 | tee {fifo} | sha256sum > {tmp}/sum; wait")
        start = time.perf_counter()
        subprocess.run(["bash", "-c", script], check=True)
        wall = time.perf_counter() - start
        size = int(Path(tmp, "size").read_text())
    return {"wall": wall, "size": size}


def header_speed(paths: Sequence[str]) -> dict[str, float]:
    """Headers per second: ours against Python's tarfile (TarInfo.tobuf, PAX format)."""
    entries = scan_paths(paths)
    start = time.perf_counter()
    for entry in entries:
        tar_header(entry)
    ours = time.perf_counter() - start
    infos = []
    for entry in entries:
        info = tarfile.TarInfo(entry.name)
        info.type = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE}[
            entry.kind]
        info.mode, info.size, info.linkname, info.mtime = entry.mode, entry.size, entry.target, 1
        infos.append(info)
    start = time.perf_counter()
    for info in infos:
        info.tobuf(tarfile.PAX_FORMAT)
    theirs = time.perf_counter() - start
    return {"entries": len(entries), "ours_per_s": len(entries) / ours,
            "tarfile_per_s": len(entries) / theirs}


def _child(mode: str, args: argparse.Namespace, groups: list[list[str]]) -> dict[str, object]:
    """Run one mode in a fresh interpreter so its peak RSS is not the parent's."""
    spec = json.dumps({"mode": mode, "groups": groups, "workers": args.workers,
                       "compression": args.compression, "level": args.level})
    out = subprocess.run([sys.executable, __file__, "--child", spec], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def _remove(path: Path) -> None:
    """rmtree that first makes the store-like 0555 directories writable again."""
    for directory, _dirs, _files in os.walk(path):
        os.chmod(directory, 0o755)
    shutil.rmtree(path, ignore_errors=True)


# --- main --------------------------------------------------------------------------------------


def _mbs(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds


def report(input_bytes: int, groups: list[list[str]], ours: dict[str, dict[str, object]],
           reference: dict[str, object] | None, headers: dict[str, float],
           args: argparse.Namespace) -> dict[str, object]:
    print(f"input: {input_bytes / MB:.0f} MB in {len(groups)} layers, "
          f"{args.workers} workers, {args.compression} level {args.level or 'default'}, "
          f"{os.cpu_count()} CPUs")
    print(f"headers/s: ours {headers['ours_per_s']:.0f}, tarfile {headers['tarfile_per_s']:.0f}"
          f" ({headers['entries']} entries)")
    summary: dict[str, object] = {"input_bytes": input_bytes, "layers": len(groups),
                                  "workers": args.workers, "headers": headers}
    if reference:
        ref_rate = _mbs(input_bytes, float(reference["wall"]))  # type: ignore[arg-type]
        print(f"reference tar|gzip -6|sha256sum: {reference['wall']:.2f} s, {ref_rate:.1f} MB/s,"
              f" {int(reference['size']) / MB:.1f} MB")  # type: ignore[call-overload]
        summary["reference"] = {**reference, "mb_s": ref_rate}
    for mode, result in ours.items():
        wall = float(result["wall"])  # type: ignore[arg-type]
        rate = _mbs(input_bytes, wall)
        rss = max(int(result["maxrss_self"]), int(result["maxrss_child"]))  # type: ignore[call-overload]
        line = (f"ours ({mode}): {wall:.2f} s, {rate:.1f} MB/s, "
                f"{int(result['size']) / MB:.1f} MB, peak RSS {rss / MB:.0f} MB")  # type: ignore[call-overload]
        entry = {**result, "mb_s": rate, "peak_rss": rss}
        if reference:
            speed = float(reference["wall"]) / wall  # type: ignore[arg-type]
            size = int(result["size"]) / int(reference["size"])  # type: ignore[call-overload]
            line += f" | throughput ×{speed:.1f}, size ×{size:.3f}"
            entry.update(throughput_ratio=speed, size_ratio=size)
        print(line)
        entry.pop("digests", None)
        summary[mode] = entry
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", help="absolute store paths or directories")
    parser.add_argument("--synthetic", type=int, metavar="MB", help="generate MB of input")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--layers", type=int, default=8, help="split the input into N layers")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="gzip")
    parser.add_argument("--level", type=int, default=None)
    parser.add_argument("--modes", default="threads,processes",
                        help="comma list of threads, processes, serial")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="generate the synthetic tree here, keep it")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_ours(spec["groups"], spec["mode"], spec["workers"],
                                  spec["compression"], spec["level"])))
        return 0

    tmp = None
    paths = [os.path.abspath(p) for p in args.paths]
    if args.synthetic:
        base = Path(args.keep) if args.keep else Path(tmp := tempfile.mkdtemp(prefix="packbench-"))
        if not (base / "store").exists():
            make_synthetic(base, args.synthetic)
        paths += sorted(str(p) for p in (base / "store").iterdir())
    if not paths:
        parser.error("give store paths or --synthetic MB")
    try:
        groups = plan_layers(paths, args.layers)
        input_bytes = warm_cache(paths)
        headers = header_speed(paths)
        ours = {mode: _child(mode, args, groups) for mode in args.modes.split(",")}
        digests = {tuple(r["digests"]) for r in ours.values()}  # type: ignore[arg-type]
        if len(digests) != 1:
            print("ERROR: modes produced different layers", file=sys.stderr)
            return 1
        reference = None if args.no_reference else run_reference(paths)
        summary = report(input_bytes, groups, ours, reference, headers, args)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        if tmp:
            _remove(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
