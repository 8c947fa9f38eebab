"""The builder's subcommands of ``niximage``: plan, build, export, sbom, diff, layers.

Imports the builder's pipeline and the core; the ``niximage`` command line
(``niximage_cli``) adds these to its parser with ``register`` and maps errors to exit
status. Nothing here knows the registry or the operator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from niximage_builder import build, export, layering, nixcli, plan, popularity, sourcing
from niximage_core import imagespec, inspection, layout, reference, resource, sources
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NixImageError
from niximage_core.result import BuildError, BuildResult
from niximage_core.storage import factory
from niximage_core.storage.base import Storage

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
    parser.add_argument(
        "--arch",
        action="append",
        metavar="ARCH",
        help=f"{' or '.join(sorted(imagespec.names.ARCHITECTURES))} (default amd64); several "
        "(--arch amd64,arm64, or the flag again): one image index of them",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="Nix wall-clock limit, s")
    add_cache_arguments(parser)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Binary cache flags: what builds substitute from (also ``niximage serve``'s)."""
    group = parser.add_argument_group("binary caches")
    group.add_argument(
        "--substituter",
        action="append",
        default=[],
        metavar="URL",
        help="a binary cache (http(s):// or file://), again for more: the closure is read "
        "from their narinfo and new layers are packed from their NARs, with no store write",
    )
    group.add_argument(
        "--trusted-public-key",
        action="append",
        default=[],
        metavar="NAME:KEY",
        help="a key the caches' paths must be signed with (nix-store "
        "--generate-binary-cache-key writes one), again for more",
    )
    group.add_argument("--netrc-file", metavar="FILE", help="credentials for the caches")


def nix_settings(args: argparse.Namespace, timeout: float) -> nixcli.NixSettings:
    """Nix settings from the command line's flags (the caches checked here, before Nix)."""
    if not args.substituter and not args.trusted_public_key:
        return nixcli.NixSettings(timeout=timeout)
    # Only now: the HTTP client and the signature check cost start-up time.
    from niximage_builder.binarycache.fetch import check_url
    from niximage_builder.binarycache.narinfo import TrustedKeys

    substituters = tuple(check_url(url) for url in args.substituter)
    if args.trusted_public_key and not substituters:
        raise InvalidInput("--trusted-public-key needs a --substituter")
    if substituters and not args.trusted_public_key:
        raise InvalidInput(
            "--substituter needs a --trusted-public-key: paths are taken only when signed"
        )
    TrustedKeys.parse(args.trusted_public_key)
    return nixcli.NixSettings(
        timeout=timeout,
        substituters=substituters,
        trusted_public_keys=tuple(args.trusted_public_key),
        netrc_file=args.netrc_file,
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add plan, build, export, sbom, diff and layers to the ``niximage`` parser."""
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

    sbom_parser = commands.add_parser("sbom", help="print an image's SBOM (CycloneDX JSON)")
    sbom_parser.add_argument("ref", metavar="REF", help="REPOSITORY[:TAG] or REPOSITORY@DIGEST")
    _add_inspection_arguments(sbom_parser)
    sbom_parser.set_defaults(run=run_sbom)

    diff_parser = commands.add_parser("diff", help="what changed between two images")
    diff_parser.add_argument("old", metavar="OLD", help="REPOSITORY[:TAG] or REPOSITORY@DIGEST")
    diff_parser.add_argument("new", metavar="NEW", help="the same, for the newer image")
    _add_inspection_arguments(diff_parser)
    diff_parser.add_argument("--json", action="store_true", help="print JSON")
    diff_parser.set_defaults(run=run_diff)

    layers_parser = commands.add_parser("layers", help="plan the layers of a closure graph")
    layers_parser.add_argument("graph", metavar="GRAPH.json")
    layers_parser.add_argument("--popularity", help="popularity data (Nixery popcount JSON)")
    layers_parser.add_argument("--budget", type=int, default=94)
    layers_parser.set_defaults(run=run_layers)


def spec_from_args(args: argparse.Namespace, settings: nixcli.NixSettings) -> imagespec.ImageSpec:
    if not args.packages:
        raise InvalidInput("no packages given")
    source = sources.parse_source(args.package_source or default_package_source())
    source = nixcli.pin_source(source, settings)
    arches = architectures(args.arch) or ["amd64"]
    if len(arches) > 1:
        raise InvalidInput("plan shows one architecture at a time: give one --arch")
    return imagespec.make_spec(list(args.packages), source, arch=arches[0])


def architectures(flags: list[str] | None) -> list[str]:
    """``--arch`` values, comma lists split, in the order given; empty when not given."""
    return [arch.strip() for flag in flags or () for arch in flag.split(",")]


def run_plan(args: argparse.Namespace) -> int:
    settings = nix_settings(args, args.timeout)
    spec = spec_from_args(args, settings)
    with sourcing.obtain(spec, settings) as obtained:  # with caches: nothing downloaded
        doc = plan.plan_document(spec, obtained.graph)
    print(json.dumps(doc, indent=2) if args.json else plan.plan_table(doc))
    return 0


def _progress(quiet: bool = False) -> build.Progress | None:
    """Progress lines on stderr, only when a person is watching."""
    if quiet or not sys.stderr.isatty():
        return None
    return lambda message: print(f"niximage: {message}", file=sys.stderr, flush=True)


def _build_target(
    args: argparse.Namespace, settings: nixcli.NixSettings
) -> tuple[imagespec.BuildTarget, tuple[str, str] | None]:
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
        choices: dict[str, Any] = {
            "architectures": image.spec.platform_architectures,
            "format": image.spec.format,
            "compression": image.spec.compression,
        }
    else:
        if not args.packages:
            raise InvalidInput("no packages given (or -f FILE)")
        packages, tag, choices = list(args.packages), None, {}
    choices.update({k: getattr(args, k) for k in ("format", "compression") if getattr(args, k)})
    if args.arch:
        choices["architectures"] = architectures(args.arch)
    pinned = nixcli.pin_source(sources.parse_source(source), settings)
    spec = imagespec.make_target(packages, pinned, **choices)
    if args.tag:
        ref = reference.ImageRef.parse(args.tag)
        tag = (ref.repository, ref.tag or "latest")
    return spec, tag


def run_build(args: argparse.Namespace) -> int:
    settings = nix_settings(args, args.timeout)
    spec, tag = _build_target(args, settings)
    options = build.BuildOptions(
        budget=args.budget,
        popularity=popularity.load(args.popularity) if args.popularity else None,
        use_cache=not args.rebuild,
    )
    store = factory.open_storage(args.storage)
    try:
        try:
            result = build.build_target(spec, store, settings, options, _progress())
        except NixImageError as error:
            if args.termination_log:
                _write_termination(args.termination_log, spec, None, error)
            raise
        if tag:
            layout.record_tag(store, *tag, result)
        if args.termination_log:
            _write_termination(args.termination_log, spec, result, None)
    finally:
        store.close()
    print(result.to_json().decode())
    return 0


def _write_termination(
    path: str,
    spec: imagespec.BuildTarget,
    result: BuildResult | None,
    error: NixImageError | None,
) -> None:
    """The builder pod's short summary (the full result is in ``builds/<key>``)."""
    if result is None:
        assert error is not None
        result = BuildResult(
            buildKey=spec.build_key(),
            spec=imagespec.spec_document(spec),
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


def _add_inspection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="DIR or gs://BUCKET")
    parser.add_argument("--arch", help="the platform of an image index (default amd64)")


def _platform_image(store: Storage, text: str, arch: str | None) -> Digest:
    digest = inspection.resolve(store, reference.ImageRef.parse(text))
    return inspection.platform_image(store, digest, arch)


def run_sbom(args: argparse.Namespace) -> int:
    store = factory.open_storage(args.storage)
    try:
        document = inspection.sbom(store, _platform_image(store, args.ref, args.arch))
    finally:
        store.close()
    print(json.dumps(document, indent=2, sort_keys=True))
    return 0


def run_diff(args: argparse.Namespace) -> int:
    store = factory.open_storage(args.storage)
    try:
        old = _platform_image(store, args.old, args.arch)
        new = _platform_image(store, args.new, args.arch)
        change = inspection.diff_images(store, old, new)
    finally:
        store.close()
    print(json.dumps(change.to_json(), indent=2) if args.json else change.render())
    return 0


def run_layers(args: argparse.Namespace) -> int:
    print(json.dumps(layering.layers_command(args.graph, args.popularity, args.budget), indent=2))
    return 0
