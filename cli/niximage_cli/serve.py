"""On-demand builds for ``niximage serve``: the builder's pipeline, handed to the registry.

The registry (niximage_registry) never imports the build pipeline; this module is where
the two meet: it pins the package source once and wraps ``build.build_target`` with the
Nix settings of the command line.
"""

from __future__ import annotations

import argparse
import threading

from niximage_builder import build, nixcli
from niximage_builder.commands import default_package_source, nix_settings
from niximage_core import sources
from niximage_core.imagespec import BuildTarget
from niximage_core.result import BuildResult
from niximage_core.storage.base import Storage
from niximage_registry.command import OnDemandBuilds


def on_demand_builds(args: argparse.Namespace) -> OnDemandBuilds:
    nix = nix_settings(args, args.build_timeout)
    text = args.package_source or default_package_source()
    # Pinned once: every on-demand image of this process has the same source.
    source = nixcli.pin_source(sources.parse_source(text), nix)
    options = build.BuildOptions()

    def build_one(spec: BuildTarget, storage: Storage, cancel: threading.Event) -> BuildResult:
        return build.build_target(spec, storage, nix, options, None, cancel)

    return OnDemandBuilds(source, build_one)
