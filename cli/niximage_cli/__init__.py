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

SERVE_HELP = "serve images from storage: a pull-only OCI registry"
OPERATOR_HELP = "run the Kubernetes operator (NixImage → builder pods → status)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command`` (the subcommand about to run), the registry
    and the operator are imported only if it is theirs: `niximage build` in a builder pod
    pays for neither aiohttp nor kopf and pydantic-settings at every start."""
    parser = argparse.ArgumentParser(prog="niximage", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"niximage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    builder_commands.register(commands)

    gc_parser = commands.add_parser("gc", help="delete unreferenced blobs and cache entries")
    gc_command.add_arguments(gc_parser, builder_commands.DEFAULT_STORAGE)
    gc_parser.set_defaults(run=gc_command.run)

    serve_parser = commands.add_parser("serve", help=SERVE_HELP)
    if command in (None, "serve"):
        from niximage_registry import command as serve_command

        serve_command.add_arguments(serve_parser)
        builder_commands.add_cache_arguments(serve_parser)  # for --on-demand builds
        serve_parser.set_defaults(run=_serve)

    operator_parser = commands.add_parser("operator", help=OPERATOR_HELP)
    if command in (None, "operator"):
        from niximage_operator import command as operator_command

        operator_command.add_arguments(operator_parser)
        operator_parser.set_defaults(run=operator_command.run)
    return parser


def subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is no option (the top level has
    only ``--version`` and ``--help``, which take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


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
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(subcommand(words)).parse_args(words)
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
