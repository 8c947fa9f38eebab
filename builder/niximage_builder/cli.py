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
from pathlib import Path
from typing import Any

from niximage_builder import (
    __version__,
    build,
    export,
    imagespec,
    layering,
    nixcli,
    plan,
    popularity,
    reference,
    resource,
    sources,
)
from niximage_builder import gc as gc_command  # not plain "gc": that is the stdlib's
from niximage_builder.errors import InvalidInput, NixImageError, PackagesNotFound
from niximage_builder.registry import command as serve_command
from niximage_builder.result import BuildError, BuildResult
from niximage_builder.storage import factory

DEFAULT_SOURCE_ENV = "NIXIMAGE_PACKAGE_SOURCE"
DEFAULT_STORAGE = os.environ.get("NIXIMAGE_STORAGE", ".niximage")


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
    parser.add_argument("--arch", choices=sorted(imagespec.names.ARCHITECTURES))
    parser.add_argument("--timeout", type=float, default=3600.0, help="Nix wall-clock limit, s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="niximage", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"niximage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    plan_parser = commands.add_parser("plan", help="resolve packages and show the closure")
    _add_spec_arguments(plan_parser)
    plan_parser.add_argument("--json", action="store_true", help="print JSON")
    plan_parser.set_defaults(run=run_plan)

    build_parser_ = commands.add_parser("build", help="build an image into storage")
    _add_spec_arguments(build_parser_)
    build_parser_.add_argument("-f", "--file", help="a NixImage resource (YAML) to build")
    build_parser_.add_argument("--storage", default=DEFAULT_STORAGE, help="DIR or gs://BUCKET")
    build_parser_.add_argument("--tag", help="record REPOSITORY:TAG for the image")
    build_parser_.add_argument("--format", choices=["oci", "docker"], default=None)
    build_parser_.add_argument("--compression", choices=["gzip", "zstd"], default=None)
    build_parser_.add_argument("--budget", type=int, default=94, help="store-path layers at most")
    build_parser_.add_argument("--popularity", help="popularity data (Nixery popcount JSON)")
    build_parser_.add_argument("--rebuild", action="store_true", help="ignore a stored result")
    build_parser_.add_argument(
        "--termination-log", help="write a short summary here (builder pods)"
    )
    build_parser_.set_defaults(run=run_build)

    export_parser = commands.add_parser("export", help="write an image as an OCI layout")
    export_parser.add_argument("ref", metavar="REF", help="REPOSITORY[:TAG] or REPOSITORY@DIGEST")
    export_parser.add_argument("directory", metavar="OCI_DIR")
    export_parser.add_argument("--storage", default=DEFAULT_STORAGE, help="DIR or gs://BUCKET")
    export_parser.set_defaults(run=run_export)

    gc_parser = commands.add_parser("gc", help="delete unreferenced blobs and cache entries")
    gc_command.add_arguments(gc_parser, DEFAULT_STORAGE)
    gc_parser.set_defaults(run=gc_command.run)

    serve_parser = commands.add_parser(
        "serve", help="serve images from storage: a pull-only OCI registry"
    )
    serve_command.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve_command.run)

    operator_parser = commands.add_parser(
        "operator", help="run the Kubernetes operator (NixImage → builder pods → status)"
    )
    _add_operator(operator_parser)

    layers_parser = commands.add_parser("layers", help="plan the layers of a closure graph")
    layers_parser.add_argument("graph", metavar="GRAPH.json")
    layers_parser.add_argument("--popularity", help="popularity data (Nixery popcount JSON)")
    layers_parser.add_argument("--budget", type=int, default=94)
    layers_parser.set_defaults(run=run_layers)
    return parser


def _add_operator(parser: argparse.ArgumentParser) -> None:
    # The operator lives in its own package (operator/); the builder only hands it the
    # command line, so the dependency stays one-way apart from this entry point.
    from niximage_operator import command as operator_command

    operator_command.add_arguments(parser)
    parser.set_defaults(run=operator_command.run)


def spec_from_args(args: argparse.Namespace, settings: nixcli.NixSettings) -> imagespec.ImageSpec:
    if not args.packages:
        raise InvalidInput("no packages given")
    source = sources.parse_source(args.package_source or default_package_source())
    source = nixcli.pin_source(source, settings)
    return imagespec.make_spec(list(args.packages), source, arch=args.arch or "amd64")


def run_plan(args: argparse.Namespace) -> int:
    settings = nixcli.NixSettings(timeout=args.timeout)
    spec = spec_from_args(args, settings)
    realised = nixcli.realise(spec, settings)
    doc = plan.plan_document(spec, realised.graph)
    print(json.dumps(doc, indent=2) if args.json else plan.plan_table(doc))
    return 0


def _progress(quiet: bool = False) -> build.Progress | None:
    """Progress lines on stderr, only when a person is watching."""
    if quiet or not sys.stderr.isatty():
        return None
    return lambda message: print(f"niximage: {message}", file=sys.stderr, flush=True)


def _build_target(
    args: argparse.Namespace, settings: nixcli.NixSettings
) -> tuple[imagespec.ImageSpec, tuple[str, str] | None]:
    """The spec to build and the tag to record, from packages or a NixImage file.

    Flags given on the command line win over the file's values.
    """
    source = args.package_source or default_package_source()
    if args.file:
        if args.packages:
            raise InvalidInput("give packages or -f FILE, not both")
        image = resource.load_file(args.file)
        packages, tag = image.spec.packages, (image.repository, image.spec.tag)
        source = image.spec.packageSource or source
        choices = {
            "arch": image.spec.arch,
            "format": image.spec.format,
            "compression": image.spec.compression,
        }
    else:
        if not args.packages:
            raise InvalidInput("no packages given (or -f FILE)")
        packages, tag, choices = list(args.packages), None, {}
    choices.update({k: getattr(args, k) for k in ("format", "compression") if getattr(args, k)})
    if args.arch:
        choices["arch"] = args.arch
    pinned = nixcli.pin_source(sources.parse_source(source), settings)
    spec = imagespec.make_spec(packages, pinned, **choices)
    if args.tag:
        ref = reference.ImageRef.parse(args.tag)
        tag = (ref.repository, ref.tag or "latest")
    return spec, tag


def run_build(args: argparse.Namespace) -> int:
    settings = nixcli.NixSettings(timeout=args.timeout)
    spec, tag = _build_target(args, settings)
    options = build.BuildOptions(
        budget=args.budget,
        popularity=popularity.load(args.popularity) if args.popularity else None,
        use_cache=not args.rebuild,
    )
    store = factory.open_storage(args.storage)
    try:
        try:
            result = build.build_image(spec, store, settings, options, _progress())
        except NixImageError as error:
            if args.termination_log:
                _write_termination(args.termination_log, spec, None, error)
            raise
        if tag:
            build.record_tag(store, *tag, result)
        if args.termination_log:
            _write_termination(args.termination_log, spec, result, None)
    finally:
        store.close()
    print(result.to_json().decode())
    return 0


def _write_termination(
    path: str, spec: imagespec.ImageSpec, result: BuildResult | None, error: NixImageError | None
) -> None:
    """The builder pod's short summary (the full result is in ``builds/<key>``)."""
    if result is None:
        assert error is not None
        result = BuildResult(
            buildKey=spec.build_key(),
            spec=spec.model_dump(mode="json"),
            ok=False,
            error=BuildError.from_exception(error),
        )
    with open(path, "w") as stream:
        stream.write(result.termination_message())


def run_export(args: argparse.Namespace) -> int:
    store = factory.open_storage(args.storage)
    try:
        digest = export.export_layout(
            store, reference.ImageRef.parse(args.ref), Path(args.directory)
        )
    finally:
        store.close()
    print(json.dumps({"digest": str(digest), "layout": args.directory}))
    return 0


def run_layers(args: argparse.Namespace) -> int:
    print(json.dumps(layering.layers_command(args.graph, args.popularity, args.budget), indent=2))
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
