"""What an operator restart asks of GCS for NixImages that are already Ready.

kopf resumes every NixImage when the operator starts. A full reconcile looks the build up
(``layout.cached_result``: it reads ``builds/<key>`` and touches every blob of the image,
a server-side rewrite per blob on GCS, so gc spares them until they are tagged). A NixImage
already Ready for its spec whose tag still names its image skips that: one read of the tag
(``reconciling._tag_names``). Both run here against fake-gcs-server on the same images.

    python benchmarks/operator_restart.py [--images 200] [--sets 20] [--layers 30]

Figures: milliseconds per NixImage for each way, their ratio, and the storage calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT / p)
    for p in ("tests/operator", "tests", "core", "builder", "registry", "operator", ".")
]

from operator_samples import target  # noqa: E402

from niximage_core import layout  # noqa: E402
from niximage_core.storage.gcs import GcsStorage  # noqa: E402
from niximage_operator import reconciling  # noqa: E402
from tests.gc.support import put_image, result_for  # noqa: E402
from tests.storage.gcs_emulator import GcsEmulator  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="Ready NixImages")
    parser.add_argument("--sets", type=int, default=20, help="distinct package sets")
    parser.add_argument("--layers", type=int, default=30, help="layers per image")
    args = parser.parse_args(argv)

    with GcsEmulator() as emulator:
        emulator.create_bucket("bench")
        client = emulator.client()
        storage = GcsStorage("bench", "restart", client)
        images = []
        for index in range(args.sets):
            key = f"{index:064x}"
            seeds = [f"shared-{n}" for n in range(args.layers // 2)]
            seeds += [f"set-{index}-{n}" for n in range(args.layers - len(seeds))]
            image = put_image(storage, seeds, build_key=key)
            images.append((key, image))
        statuses = []
        for number in range(args.images):
            key, image = images[number % args.sets]
            resolved = target(name=f"image-{number}")
            layout.record_tag(storage, resolved.repository, resolved.tag, result_for(image, key))
            statuses.append((key, resolved, {"digest": str(image.manifest)}))

        started = time.perf_counter()
        for key, _resolved, _status in statuses:
            assert layout.cached_result(storage, key) is not None
        full = (time.perf_counter() - started) / args.images

        started = time.perf_counter()
        for _key, resolved, status in statuses:
            assert reconciling._tag_names(storage, resolved, status)
        shortcut = (time.perf_counter() - started) / args.images
        client.close()

    print(f"{args.images} Ready NixImages over {args.sets} images of {args.layers} layers")
    print(f"  full reconcile lookup: {full * 1000:7.1f} ms per NixImage")
    print(f"  tag check (restart):   {shortcut * 1000:7.1f} ms per NixImage")
    print(f"  ratio full / tag check: {full / shortcut:.0f}x")
    print(f"  storage calls per NixImage: 1 read + {args.layers + 2} blob touches vs 1 read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
