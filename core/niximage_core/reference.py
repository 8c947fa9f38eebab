"""Repository names, tags and references: the distribution spec's grammars. Pure.

Imports digest and errors. Everything a client or a user sends as a name, tag or digest
passes here before it is used as a storage key, so path tricks never reach storage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput

# distribution-spec: <name> and <reference> grammars.
_NAME = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_NAME = 255


def check_repository(name: str) -> str:
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise InvalidInput(f"invalid repository name {name[:100]!r}")
    return name


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise InvalidInput(f"invalid tag {tag[:140]!r}")
    return tag


def is_digest(reference: str) -> bool:
    return ":" in reference


@dataclass(frozen=True)
class ImageRef:
    """``repository:tag`` or ``repository@sha256:…`` (no registry host part)."""

    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        if "@" in text:
            repository, _, digest = text.partition("@")
            return cls(check_repository(repository), digest=Digest.parse(digest))
        repository, sep, tag = text.rpartition(":")
        if not sep or "/" in tag:
            return cls(check_repository(text), tag="latest")
        return cls(check_repository(repository), tag=check_tag(tag))

    def __str__(self) -> str:
        return (
            f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"
        )
