"""The ``niximage`` command line: argument parsing, dispatch, errors → exit status.

The composition root, and the only package that imports all three components: the
builder's subcommands (plan, build, export, layers), the core's ``gc``, the registry's
``serve`` (handed the builder's pipeline for on-demand builds) and the operator's
``operator``. Nothing imports this package.

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

from niximage_builder import commands as builder_commands
from niximage_core import __version__
from niximage_core.errors import InvalidInput, NixImageError, PackagesNotFound
from niximage_core.gc import command as gc_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="niximage", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"niximage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    builder_commands.register(commands)

    gc_parser = commands.add_parser("gc", help="delete unreferenced blobs and cache entries")
    gc_command.add_arguments(gc_parser, builder_commands.DEFAULT_STORAGE)
    gc_parser.set_defaults(run=gc_command.run)

    # The registry and the operator are imported when their subcommand runs: `niximage
    # build` in a builder pod should not pay for aiohttp or kopf at every start.
    serve_parser = commands.add_parser(
        "serve", help="serve images from storage: a pull-only OCI registry"
    )
    from niximage_registry import command as serve_command

    serve_command.add_arguments(serve_parser)
    serve_parser.set_defaults(run=_serve)

    operator_parser = commands.add_parser(
        "operator", help="run the Kubernetes operator (NixImage → builder pods → status)"
    )
    from niximage_operator import command as operator_command

    operator_command.add_arguments(operator_parser)
    operator_parser.set_defaults(run=operator_command.run)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from niximage_cli import serve
    from niximage_registry import command as serve_command

    return serve_command.run(args, serve.on_demand_builds)


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
