"""``niximage operator``: flags on top of ``NIXIMAGE_OPERATOR_*`` variables, then run.

Imports settings and running. ``add_arguments`` and ``run`` plug into the ``niximage``
command line; ``python -m niximage_operator`` uses them on their own. A flag given on the
command line wins over its environment variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pydantic import ValidationError

from niximage_operator.settings import ENV_PREFIX, OperatorSettings

EXIT_CONFIGURATION = 2

# flag → settings field; lists are given once per item or comma-separated.
_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--storage": (
        "storage",
        {"metavar": "URL", "help": "storage shared with builders and registry (gs://… or DIR)"},
    ),
    "--registry": (
        "registry",
        {"metavar": "HOST[:PORT]", "help": "registry in image references"},
    ),
    "--builder-image": ("builder_image", {"metavar": "IMAGE", "help": "image of builder pods"}),
    "--default-package-source": (
        "default_package_source",
        {"metavar": "SRC", "help": "source of NixImages without one (path:/dir#sha256-…)"},
    ),
    "--package-source": (
        "package_sources",
        {"metavar": "SRC", "action": "append", "help": "another pinned path: source (repeat)"},
    ),
    "--namespace": (
        "namespaces",
        {"metavar": "NS", "action": "append", "help": "namespace to watch (repeat; default all)"},
    ),
    "--max-concurrent-builds": ("max_concurrent_builds", {"metavar": "N", "type": int}),
    "--build-timeout": ("build_timeout", {"metavar": "SECONDS", "type": float}),
    "--max-attempts": ("max_attempts", {"metavar": "N", "type": int}),
    "--builder-service-account": ("builder_service_account", {"metavar": "NAME"}),
    "--builder-resources": (
        "builder_resources",
        {"metavar": "JSON", "type": json.loads, "help": "container resources"},
    ),
    "--nix-store-volume": (
        "nix_store_volume",
        {"metavar": "JSON", "type": json.loads, "help": "volume source of the Nix store"},
    ),
    "--gc-interval": (
        "gc_interval",
        {"metavar": "DURATION", "help": "run garbage collection this often (default: never)"},
    ),
    "--gc-grace": (
        "gc_grace",
        {"metavar": "DURATION", "help": "gc keeps unreferenced blobs younger than this (1h)"},
    ),
    "--metrics-port": ("metrics_port", {"metavar": "PORT", "type": int}),
    "--liveness": ("liveness", {"metavar": "URL", "help": "e.g. http://0.0.0.0:8080/healthz"}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (field, options) in _FLAGS.items():
        env = ENV_PREFIX + field.upper()
        parser.add_argument(
            flag,
            dest=f"operator_{field}",
            default=None,
            **{**options, "help": f"{options.get('help', '')} [${env}]".strip()},
        )
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def settings_from(args: argparse.Namespace) -> OperatorSettings:
    """Settings from the environment, overridden by the flags that were given."""
    given = {
        field: getattr(args, f"operator_{field}")
        for field, _ in _FLAGS.values()
        if getattr(args, f"operator_{field}", None) is not None
    }
    return OperatorSettings(**given)


def describe(error: ValidationError) -> str:
    """One line per problem, naming the variable to set."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        name = str(problem["loc"][0]) if problem["loc"] else field
        flag = next((f for f, (n, _) in _FLAGS.items() if n == name), None)
        where = f"${ENV_PREFIX}{name.upper()}" + (f" or {flag}" if flag else "")
        lines.append(f"{field}: {problem['msg']} ({where})")
    return "; ".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        config = settings_from(args)
    except ValidationError as exc:
        print(f"niximage operator: invalid configuration: {describe(exc)}", file=sys.stderr)
        return EXIT_CONFIGURATION
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from niximage_core.errors import NixImageError
    from niximage_operator import running  # imports kopf and registers the handlers
    from niximage_operator.kube import KubeError

    try:
        running.run(config)
    except (NixImageError, KubeError) as exc:  # an unpinned path, no credentials, …
        print(f"niximage operator: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    except KeyboardInterrupt:
        return 130
    return 0
