"""How long ``niximage gc`` takes on a store of many images, and what the protocol costs a
build (a touch per reused blob instead of a size lookup).

    PYTHONPATH=core:. python benchmarks/gc.py /tmp/niximage-gc-bench --images 200
    STORAGE_EMULATOR_HOST=http://127.0.0.1:4443 PYTHONPATH=core:. \\
        python benchmarks/gc.py gs://bucket/gc-bench --images 50

Fills the store with synthetic images (``--layers`` each, half of them shared with a common
base), tags the first half, then times: a dry run, a touch and a size lookup of every blob,
and a real run that deletes the untagged half. Filesystem stores are aged by setting mtimes
back; on GCS the run waits out a short grace period instead.
"""

from __future__ import annotations

import argparse
import os
import time

from niximage_core import gc
from niximage_core.storage.factory import open_storage
from niximage_core.storage.filesystem import FilesystemStorage
from tests.gc.support import put_image

GCS_GRACE = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="storage URL: a path, file:///path or gs://bucket[/prefix]")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--layers", type=int, default=20)
    args = parser.parse_args(argv)
    storage = open_storage(args.url)
    local = isinstance(storage, FilesystemStorage)

    started = time.perf_counter()
    shared = [f"base-{n}" for n in range(args.layers // 2)]
    for index in range(args.images):
        own = [f"image-{index}-{n}" for n in range(args.layers - len(shared))]
        tag = ("bench/image", str(index)) if index < args.images // 2 else None
        put_image(storage, shared + own, tag=tag)
    print(f"{storage.url}: {args.images} images filled in {time.perf_counter() - started:.1f} s")

    grace = gc.DEFAULT_GRACE if local else GCS_GRACE
    if local:
        then = time.time() - 2 * grace
        for directory, _dirs, files in os.walk(storage.root):
            for name in files:
                os.utime(os.path.join(directory, name), (then, then))
    else:
        time.sleep(grace + 0.5)

    dry = _timed("dry run", lambda: gc.collect(storage, grace, dry_run=True))
    digests = [d for d, _size, _mtime in storage.list_blobs()]
    _timed(f"blob_size × {len(digests)}", lambda: [storage.blob_size(d) for d in digests])
    _timed(f"touch × {len(digests)}", lambda: [gc.touch_blob(storage, d) for d in digests])
    # The touches made everything fresh: age again before the real run.
    if local:
        then = time.time() - 2 * grace
        for directory, _dirs, files in os.walk(storage.root):
            for name in files:
                os.utime(os.path.join(directory, name), (then, then))
    else:
        time.sleep(grace + 0.5)
    done = _timed("collect", lambda: gc.collect(storage, grace))
    print(f"dry run listed {len(dry.blobs)} blobs, the run deleted {len(done.blobs)}")
    storage.close()
    return 0


def _timed(what: str, action: object) -> gc.Report:
    started = time.perf_counter()
    result = action()  # type: ignore[operator]
    print(f"{what}: {time.perf_counter() - started:.2f} s")
    return result  # type: ignore[no-any-return]


if __name__ == "__main__":
    raise SystemExit(main())
