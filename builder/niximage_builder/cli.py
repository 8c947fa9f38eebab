"""The ``niximage`` command line: argument parsing, dispatch, errors → exit status.

Exit status: 0 success; 2 bad input or missing packages (the user must change something);
1 Nix, storage or other failures. Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from niximage_builder import __version__, imagespec, nixcli, plan, sources
from niximage_builder.errors import InvalidInput, NixImageError, PackagesNotFound

DEFAULT_SOURCE_ENV = "NIXIMAGE_PACKAGE_SOURCE"


def default_package_source() -> str:
    """The embedded default: the bundled offline package set, unless configured."""
    return os.environ.get(DEFAULT_SOURCE_ENV) or f"path:{nixcli.NIX_DIR / 'testpkgs'}"


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("packages", nargs="*", metavar="PKG", help="Nix attribute paths")
    parser.add_argument(
        "--package-source",
        default=None,
        help="path:/dir, nixpkgs:<channel|commit> or git:<url>#<rev|ref> "
        f"(default: ${DEFAULT_SOURCE_ENV} or the bundled offline set)",
    )
    parser.add_argument("--arch", default="amd64", choices=sorted(imagespec.names.ARCHITECTURES))
    parser.add_argument("--timeout", type=float, default=3600.0, help="Nix wall-clock limit, s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="niximage", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"niximage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    plan_parser = commands.add_parser("plan", help="resolve packages and show the closure")
    _add_spec_arguments(plan_parser)
    plan_parser.add_argument("--json", action="store_true", help="print JSON")
    plan_parser.set_defaults(run=run_plan)
    return parser


def spec_from_args(args: argparse.Namespace, settings: nixcli.NixSettings) -> imagespec.ImageSpec:
    if not args.packages:
        raise InvalidInput("no packages given")
    source = sources.parse_source(args.package_source or default_package_source())
    source = nixcli.pin_source(source, settings)
    return imagespec.make_spec(list(args.packages), source, arch=args.arch)


def run_plan(args: argparse.Namespace) -> int:
    settings = nixcli.NixSettings(timeout=args.timeout)
    spec = spec_from_args(args, settings)
    realised = nixcli.realise(spec, settings)
    doc = plan.plan_document(spec, realised.graph)
    print(json.dumps(doc, indent=2) if args.json else plan.plan_table(doc))
    return 0


def error_document(error: NixImageError) -> dict[str, Any]:
    doc: dict[str, Any] = {"error": error.kind, "message": str(error)}
    if isinstance(error, PackagesNotFound):
        doc["missingPackages"] = error.names
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (InvalidInput, PackagesNotFound) as exc:
        print(f"niximage: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(error_document(exc), indent=2))
        return 2
    except NixImageError as exc:
        print(f"niximage: {exc}", file=sys.stderr)
        log = getattr(exc, "log", "")
        if log and os.environ.get("NIXIMAGE_DEBUG"):
            print(log, file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(error_document(exc), indent=2))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
