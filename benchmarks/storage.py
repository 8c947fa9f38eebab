"""Blob write/read throughput of a storage backend, and the writer's peak Python memory.

    PYTHONPATH=core python benchmarks/storage.py /tmp/niximage-bench --size-mib 256
    STORAGE_EMULATOR_HOST=http://127.0.0.1:4443 PYTHONPATH=core \\
        python benchmarks/storage.py gs://bucket/bench

Writes one blob of random-looking bytes in 1 MiB writes (as the layer packer does), reads
it back, deletes it. Against fake-gcs-server the numbers say little about real GCS (the
emulator copies the whole object on every chunk it receives).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import tracemalloc

from niximage_core.digest import Digest
from niximage_core.storage.base import iter_chunks
from niximage_core.storage.factory import open_storage

MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="storage URL: a path, file:///path or gs://bucket[/prefix]")
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--write-kib", type=int, default=1024)
    args = parser.parse_args(argv)

    storage = open_storage(args.url)
    source = os.urandom(args.write_kib * 1024 + 4096)
    writes = args.size_mib * MiB // (args.write_kib * 1024)
    pieces = [source[i % 4096 : i % 4096 + args.write_kib * 1024] for i in range(16)]
    digest = Digest(_hash(pieces, writes))

    tracemalloc.start()
    started = time.perf_counter()
    with storage.blob_writer() as writer:
        for i in range(writes):
            writer.write(pieces[i % 16])
        writer.commit(digest)
    wrote = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    started = time.perf_counter()
    with storage.open_blob(digest) as stream:
        read = sum(len(chunk) for chunk in iter_chunks(stream, 4 * MiB))
    reading = time.perf_counter() - started
    storage.delete_blob(digest)
    storage.close()

    size = writes * args.write_kib * 1024
    assert read == size
    print(f"{storage.url}: {size / MiB:.0f} MiB")
    print(f"  write  {size / MiB / wrote:8.1f} MiB/s   peak Python memory {peak / MiB:.1f} MiB")
    print(f"  read   {size / MiB / reading:8.1f} MiB/s")
    return 0


def _hash(pieces: list[bytes], writes: int) -> str:
    digest = hashlib.sha256()
    for i in range(writes):
        digest.update(pieces[i % 16])
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
