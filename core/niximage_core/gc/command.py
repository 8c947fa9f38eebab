"""``niximage gc`` on the command line: its flags (``add_arguments``), ``run`` and ``main``
(``python -m niximage_core.gc``).

Imports errors, units and collecting; the storage factory only when it runs, so that gc stays
importable alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from niximage_core.errors import InvalidInput, NixImageError
from niximage_core.gc.collecting import DEFAULT_GRACE, collect
from niximage_core.units import parse_duration


def add_arguments(parser: argparse.ArgumentParser, default_storage: str | None = None) -> None:
    """``niximage gc`` flags; wire with ``parser.set_defaults(run=gc.run)``."""
    parser.add_argument(
        "--storage",
        default=default_storage or os.environ.get("NIXIMAGE_STORAGE", ".niximage"),
        help="DIR or gs://BUCKET[/PREFIX]",
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    parser.add_argument(
        "--grace",
        type=_duration_argument,
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="keep unreferenced blobs younger than this (default 1h; e.g. 30m, 2h, 7d)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every deleted blob")


def _duration_argument(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the grace period must be positive")
    return seconds


def run(args: argparse.Namespace) -> int:
    """``niximage gc``: collect, then print the report (JSON with ``--json``)."""
    from niximage_core.storage import factory  # entry point only: keeps gc importable alone

    store = factory.open_storage(args.storage)
    try:
        report = collect(store, args.grace, args.dry_run)
    finally:
        store.close()
    for problem in report.dangling:
        print(f"niximage gc: warning: {problem}", file=sys.stderr)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.render(args.verbose))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m niximage_core.gc``: ``niximage gc`` on its own, with the same exit status
    (2: the input must change; 1: storage failed)."""
    parser = argparse.ArgumentParser(prog="niximage gc")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except NixImageError as exc:
        print(f"niximage gc: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1
