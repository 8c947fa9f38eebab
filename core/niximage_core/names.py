"""Package names and Nixery-style image names. Pure; imports errors only.

A *package name* is a Nix attribute path (``jq``, ``python3.pkgs.requests``). It is checked
against a strict grammar here, before it can reach Nix, and it only ever travels to Nix as
JSON data (``--argstr``), never spliced into Nix source.

An *image name* is Nixery's ``shell/git/htop``: the leading run of meta-packages is
expanded (``shell`` → an interactive shell, ``arm64`` → the architecture), the rest are
package names. Registry names are lowercase, so the Nix side also tries a case-insensitive
match (``xhello`` → ``Xhello``) and maps a leading digit to ``_`` (``1password`` →
``_1password``), as Nixery does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from niximage_core.errors import InvalidInput

MAX_NAME_LENGTH = 200
MAX_PARTS = 8
# One attribute of a path: letters, digits, '_', '-', '+'. Quotes, '$', '{', whitespace and
# '/' never pass, so no Nix syntax can be formed even if a name were ever interpolated.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_+-]*")

SHELL_PACKAGES = ("bashInteractive", "coreutils", "moreutils", "nano")
ALWAYS_ADDED = ("cacert", "iana-etc")
ARCHITECTURES = {"amd64": "x86_64-linux", "arm64": "aarch64-linux"}
META_PACKAGES = ("shell", "arm64", "multiarch")
MULTIARCH = ("amd64", "arm64")
"""The platforms of the ``multiarch`` meta-package: one image index of both."""


def check_package_name(name: object) -> str:
    """Return ``name`` if it is a valid attribute path; else raise naming the package."""
    if not isinstance(name, str):
        raise InvalidInput(f"package name must be a string, got {name!r:.100}")
    shown = repr(name[:80]) + ("…" if len(name) > 80 else "")
    if not name:
        raise InvalidInput("invalid package name '': empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"invalid package name {shown}: longer than {MAX_NAME_LENGTH}")
    parts = name.split(".")
    if len(parts) > MAX_PARTS:
        raise InvalidInput(f"invalid package name {shown}: more than {MAX_PARTS} parts")
    for part in parts:
        if not part:
            raise InvalidInput(f"invalid package name {shown}: empty attribute (e.g. '..')")
        if not _PART.fullmatch(part):
            raise InvalidInput(
                f"invalid package name {shown}: attribute {part[:40]!r} may only contain "
                "letters, digits, '_', '-' and '+'"
            )
    return name


def normalise_packages(names: Iterable[str]) -> tuple[str, ...]:
    """Validate, add the always-present packages, de-duplicate and sort."""
    checked = [check_package_name(n) for n in names]
    return tuple(sorted(set(checked) | set(ALWAYS_ADDED)))


@dataclass(frozen=True)
class ParsedImageName:
    packages: tuple[str, ...]
    """Requested packages, meta-packages expanded, not yet normalised."""
    architectures: tuple[str, ...]
    """One architecture, or (``multiarch``) the platforms of an image index."""


def parse_image_name(name: str, default_arch: str = "amd64") -> ParsedImageName:
    """Nixery's rule: only the *leading* run of meta-packages is special.

    ``shell/arm64/jq`` → bash & co + jq on arm64; ``multiarch/jq`` → jq for amd64 and
    arm64 under one image index (no peer has this name: Nixery serves arm64 images only
    under ``arm64/``); ``jq/shell`` asks for a package named ``shell``. Registry name
    components are lowercase; each component is a package name.
    """
    components = name.split("/")
    architectures: tuple[str, ...] = (default_arch,)
    chosen: list[str] = []
    packages: list[str] = []
    index = 0
    while index < len(components) and components[index] in META_PACKAGES:
        meta = components[index]
        if meta == "shell":
            packages.extend(SHELL_PACKAGES)
        else:
            chosen.append(meta)
            architectures = MULTIARCH if meta == "multiarch" else ("arm64",)
        index += 1
    if len(chosen) > 1:
        raise InvalidInput(
            f"image name {name[:100]!r} names the platforms twice ({', '.join(chosen)}): "
            "give arm64 or multiarch"
        )
    for component in components[index:]:
        packages.append(check_package_name(component))
    if not packages and index == 0:
        raise InvalidInput(f"image name {name[:100]!r} names no package")
    return ParsedImageName(tuple(packages), architectures)
