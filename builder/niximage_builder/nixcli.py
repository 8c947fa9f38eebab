"""Adapter around the Nix command line: realise packages, read closure graphs.

Imports closure, sources, imagespec and errors. Every Nix process runs in its own process
group with a wall-clock timeout and an optional cancel event; on either, the whole group
is killed so no builder is left running. stderr is kept (its tail) for error messages, and
failures are classified: packages not found (all names), evaluation error, build failure,
timeout, Nix missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from niximage_builder import closure
from niximage_core.errors import (
    NixFailure,
    NixMissing,
    NixTimeout,
    PackagesNotFound,
)
from niximage_core.imagespec import ImageSpec
from niximage_core.sources import GitSource, NixpkgsSource, PathSource

NIX_DIR = Path(__file__).resolve().parents[2] / "nix"
"""The repository's nix/ folder (prepare-image.nix, the offline package set)."""
NIXPKGS_ARCHIVE = "https://github.com/NixOS/nixpkgs/archive"
"""GitHub's tarballs of nixpkgs commits and branches (``$NIXIMAGE_NIXPKGS_ARCHIVE`` wins)."""

_NOT_FOUND = re.compile(r"niximage-not-found:(\[[^\]]*\])")
_NETWORK_FAILURE = re.compile(
    r"unable to download|Could(?: not|n't) resolve host|Failed to connect|"
    r"Connection (?:refused|timed out|reset)|Timeout was reached|SSL connect error|"
    r"unable to access '|Temporary failure in name resolution|Network is unreachable",
)
"""Nix (curl, git) could not reach a server: worth another attempt, unlike a failed
build or evaluation, which gives the same answer every time."""
_HTTP_CLIENT_ERROR = re.compile(r"HTTP error 4\d\d")
"""…except a 4xx answer: the URL or revision is wrong (a 404 for a commit that does not
exist), and asking again does not change that."""
_BUILD_FAILURE = re.compile(
    r"builder for .* failed|cannot build|is required to build|build of .* failed|"
    r"failed to build|Cannot build",
)
_STDERR_TAIL = 8000
_NIX = ("--extra-experimental-features", "nix-command")


@dataclass(frozen=True)
class NixSettings:
    timeout: float = 3600.0
    """Wall-clock seconds for one Nix invocation (evaluation, builds and downloads)."""
    nix_dir: Path = NIX_DIR
    """Folder holding prepare-image.nix."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    """Extra arguments for nix-build, e.g. ``("--option", "max-jobs", "4")``."""
    nixpkgs_archive: str = field(
        default_factory=lambda: os.environ.get("NIXIMAGE_NIXPKGS_ARCHIVE", NIXPKGS_ARCHIVE)
    )
    """Where ``nixpkgs:`` sources are fetched: ``<archive>/<channel or commit>.tar.gz``.
    A mirror serves the same bytes, so it is not part of the build key."""
    substituters: tuple[str, ...] = ()
    """Binary caches (http(s):// or file:// URLs). When given, the builder reads the
    closure from their narinfo and packs new layers from their NARs (``sourcing``), and Nix
    substitutes from these and no others. Empty: Nix's own configuration decides."""
    trusted_public_keys: tuple[str, ...] = ()
    """``name:base64`` keys; a cache's path must be signed by one of them."""
    netrc_file: str | None = None
    """Credentials for the caches, as Nix's ``netrc-file``."""

    def substituter_args(self) -> tuple[str, ...]:
        """Nix options that make it use exactly these caches (none when none are set)."""
        if not self.substituters:
            return ()
        args = [
            "--option", "substituters", " ".join(self.substituters),
            "--option", "trusted-public-keys", " ".join(self.trusted_public_keys),
        ]  # fmt: skip
        if self.netrc_file:
            args += ["--option", "netrc-file", self.netrc_file]
        return tuple(args)


@dataclass(frozen=True)
class Realised:
    roots: tuple[str, ...]
    graph: closure.ClosureGraph
    timings: dict[str, float]
    derivations_built: int = 0
    """Derivations Nix built from source (not substituted) for this image."""
    meta: tuple[dict[str, Any], ...] = ()
    """The requested packages' versions and ``meta`` (``package_meta``), for the SBOM."""


@dataclass(frozen=True)
class Output:
    """One requested package as evaluation gives it, before anything is realised."""

    path: str
    drv_path: str
    output: str

    @property
    def installable(self) -> str:
        """What ``nix-store --realise`` takes to make just this output."""
        return f"{self.drv_path}!{self.output}"


@dataclass(frozen=True)
class Evaluated:
    outputs: list[Output]
    meta: tuple[dict[str, Any], ...]


_META = re.compile(r"^trace: niximage-meta:(\[.*\])$", re.MULTILINE)


def package_meta(stderr: str) -> tuple[dict[str, Any], ...]:
    """The requested packages' versions and ``meta`` as prepare-image.nix traces them
    (one JSON line; absent from an older prepare-image.nix: then none). Pure."""
    found = _META.search(stderr)
    if found is None:
        return ()
    try:
        described = json.loads(found.group(1))
    except ValueError:
        return ()
    return tuple(d for d in described if isinstance(d, dict))


_TO_BUILD = re.compile(r"these (\d+) derivations will be built|(this derivation will be built)")


def derivations_built(stderr: str) -> int:
    """How many derivations Nix says it will build (not substitute). Pure."""
    found = _TO_BUILD.search(stderr)
    if found is None:
        return 0
    return 1 if found.group(2) else int(found.group(1))


def run_nix(
    argv: list[str], timeout: float, cancel: threading.Event | None = None
) -> tuple[str, str]:
    """Run a Nix command; return (stdout, stderr) or raise a classified error.

    The child gets its own session (process group) so that a timeout or cancellation
    kills Nix *and* the builders it started.
    """
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
    except FileNotFoundError as exc:
        raise NixMissing(f"Nix is not installed or not on PATH ({argv[0]} not found)") from exc
    deadline = time.monotonic() + timeout
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            cancelled = cancel is not None and cancel.is_set()
            if cancelled or time.monotonic() >= deadline:
                _kill_group(proc)
                what = "cancelled" if cancelled else f"timed out after {timeout:g} s"
                raise NixTimeout(
                    f"{Path(argv[0]).name} {what}; its processes were killed"
                ) from None
    if proc.returncode != 0:
        raise classify_failure(stderr)
    return stdout, stderr


def _kill_group(proc: subprocess.Popen[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.communicate(timeout=3)
            # The leader is gone; children of the group may linger: make sure.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
        break
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def classify_failure(stderr: str) -> Exception:
    """Turn a failed Nix run's stderr into the matching error. Pure."""
    found = _NOT_FOUND.search(stderr)
    if found:
        return PackagesNotFound(json.loads(found.group(1)))
    tail = stderr[-_STDERR_TAIL:]
    message = _first_error_line(stderr)
    network = bool(_NETWORK_FAILURE.search(stderr)) and not _HTTP_CLIENT_ERROR.search(stderr)
    if _BUILD_FAILURE.search(stderr):
        return NixFailure("BuildFailed", f"Nix build failed: {message}", tail, network)
    return NixFailure("EvalError", f"Nix evaluation failed: {message}", tail, network)


def _first_error_line(stderr: str) -> str:
    for line in stderr.splitlines():
        text = line.strip()
        if text.startswith("error:"):
            rest = text[len("error:") :].strip()
            return rest or text
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output from Nix"


def source_args(source: PathSource | NixpkgsSource | GitSource) -> tuple[str, str]:
    """(srcType, srcArgs JSON) for prepare-image.nix."""
    return source.type, json.dumps(source.model_dump(mode="json", exclude={"type"}))


def pin_source(
    source: PathSource | NixpkgsSource | GitSource, settings: NixSettings
) -> PathSource | NixpkgsSource | GitSource:
    """Pin a local path by the NAR hash of its contents, so the build key changes when
    the package set does; channels and refs stay unpinned (not resolvable offline)."""
    if isinstance(source, PathSource) and source.narHash is None:
        if not Path(source.path).is_dir():
            raise NixFailure("EvalError", f"package source {source.path} is not a directory")
        stdout, _ = run_nix(
            ["nix", *_NIX, "hash", "path", "--type", "sha256", "--sri", source.path],
            settings.timeout,
        )
        return source.model_copy(update={"narHash": stdout.strip()})
    return source


HOST_SYSTEMS = {"x86_64": "x86_64-linux", "aarch64": "aarch64-linux"}


def platform_args(system: str) -> tuple[str, ...]:
    """Let Nix build for ``system`` when it is not this machine's: through qemu-user's
    binfmt_misc handler where the node has one, or by substituting from a binary cache
    (Nix refuses another system's derivations unless told it may run them; without a
    handler the build then fails saying so)."""
    if HOST_SYSTEMS.get(os.uname().machine) == system:
        return ()
    return ("--option", "extra-platforms", system)


def _image_args(spec: ImageSpec, settings: NixSettings) -> list[str]:
    """prepare-image.nix and its arguments for ``spec`` (the file first)."""
    src_type, src_args = source_args(spec.source)
    arguments = {
        "packages": json.dumps(list(spec.packages)),
        "system": spec.system,
        "srcType": src_type,
        "srcArgs": src_args,
        "nixpkgsArchive": settings.nixpkgs_archive.rstrip("/"),
    }
    return [
        str(settings.nix_dir / "prepare-image.nix"),
        *(arg for name, value in arguments.items() for arg in ("--argstr", name, value)),
        *platform_args(spec.system),
        *settings.substituter_args(),
        *settings.extra_args,
    ]


def realise(
    spec: ImageSpec, settings: NixSettings, cancel: threading.Event | None = None
) -> Realised:
    """Build the spec's packages and read their runtime closure graph."""
    started = time.monotonic()
    image = _image_args(spec, settings)
    stdout, stderr = run_nix(
        ["nix-build", *image[:1], "-A", "contents", "--no-out-link", *image[1:]],
        settings.timeout,
        cancel,
    )
    built = time.monotonic()
    roots = tuple(sorted({line.strip() for line in stdout.splitlines() if line.strip()}))
    graph = closure_graph(roots, settings, cancel)
    return Realised(
        roots,
        graph,
        {"nixBuild": built - started, "closure": time.monotonic() - built},
        derivations_built(stderr),
        package_meta(stderr),
    )


def evaluate(
    spec: ImageSpec, settings: NixSettings, cancel: threading.Event | None = None
) -> Evaluated:
    """The spec's packages' store paths, derivations and meta, without building anything."""
    image = _image_args(spec, settings)
    stdout, stderr = run_nix(
        # --read-write-mode: --eval alone is read-only, so a package set not yet in the
        # store (an empty builder) would not be copied in and its paths "are not valid".
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", *image[:1],
         "-A", "outputs", *image[1:]],
        settings.timeout,
        cancel,
    )  # fmt: skip
    try:
        found = json.loads(stdout)
        outputs = [Output(str(o["path"]), str(o["drvPath"]), str(o["output"])) for o in found]
        return Evaluated(outputs, package_meta(stderr))
    except (ValueError, KeyError, TypeError) as exc:
        why = f"prepare-image.nix gave unexpected outputs: {stdout[:200]}"
        raise NixFailure("EvalError", why) from exc


def invalid_paths(
    paths: Sequence[str], settings: NixSettings, cancel: threading.Event | None = None
) -> set[str]:
    """Those of ``paths`` that this machine's store does not hold (as valid paths)."""
    if not paths:
        return set()
    stdout, _ = run_nix(
        ["nix-store", "--check-validity", "--print-invalid", *paths], settings.timeout, cancel
    )
    return {line.strip() for line in stdout.splitlines() if line.strip()}


def realise_outputs(
    outputs: Sequence[Output],
    system: str,
    settings: NixSettings,
    cancel: threading.Event | None = None,
) -> int:
    """Let Nix make these outputs (substituting what its caches have, building the rest);
    returns the number of derivations it built."""
    if not outputs:
        return 0
    _, stderr = run_nix(
        ["nix-store", "--realise", *(o.installable for o in outputs), *platform_args(system),
         *settings.substituter_args(), *settings.extra_args],
        settings.timeout,
        cancel,
    )  # fmt: skip
    return derivations_built(stderr)


def closure_graph(
    roots: tuple[str, ...], settings: NixSettings, cancel: threading.Event | None = None
) -> closure.ClosureGraph:
    """``nix path-info --json --recursive``: a list in Nix 2.8, an object in newer Nix."""
    stdout, _ = run_nix(
        ["nix", *_NIX, "path-info", "--json", "--recursive", *roots], settings.timeout, cancel
    )
    return closure.ClosureGraph(roots, closure.parse_entries(json.loads(stdout)))
