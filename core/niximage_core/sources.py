"""Package sources: where Nix gets the packages from. Pure; imports errors only.

Three kinds, as in Nixery:

- ``path``    a local directory importable like nixpkgs (the bundled offline set, a checkout);
- ``nixpkgs`` a nixpkgs channel or branch name, or a 40-hex commit, fetched as a tarball;
- ``git``     a git URL with a revision (commit) or a ref.

Only a *pinned* source makes a build reusable across time
(docs/architecture.md#identity-and-caching): a commit, or a
local path together with the NAR hash of its contents. An unpinned source is resolved by
the Nix adapter before the build key is computed.

Text form (CLI flags, operator settings): ``path:/dir`` (pinned: ``path:/dir#sha256-…``,
the form ``str()`` gives, so a pinned source survives a round trip), ``nixpkgs:nixos-24.05``,
``nixpkgs:<commit>``, ``git:https://host/repo.git#<rev-or-ref>``; a bare absolute path
means ``path:``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from niximage_core.errors import InvalidInput

_COMMIT = re.compile(r"[0-9a-f]{40}")
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_NAR_HASH = re.compile(r"sha256-[A-Za-z0-9+/]{43}=")


class _Source(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class PathSource(_Source):
    type: Literal["path"] = "path"
    path: str
    narHash: str | None = None
    """NAR hash of the directory's contents; set once resolved, it pins the source."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value or len(value) > 4096:
            raise ValueError("a path package source must be an absolute path")
        return str(Path(value))

    @field_validator("narHash")
    @classmethod
    def _nar_hash(cls, value: str | None) -> str | None:
        if value is not None and not _NAR_HASH.fullmatch(value):
            raise ValueError("narHash must be an SRI sha256 hash")
        return value

    @property
    def pinned(self) -> bool:
        return self.narHash is not None

    def __str__(self) -> str:
        return f"path:{self.path}" + (f"#{self.narHash}" if self.narHash else "")


class NixpkgsSource(_Source):
    type: Literal["nixpkgs"] = "nixpkgs"
    channel: str
    """A channel or branch name (``nixos-24.05``) or a 40-hex commit of NixOS/nixpkgs."""

    @field_validator("channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        if not _REF.fullmatch(value) or ".." in value:
            raise ValueError(f"invalid nixpkgs channel or commit {value[:100]!r}")
        return value

    @property
    def pinned(self) -> bool:
        return bool(_COMMIT.fullmatch(self.channel))

    def __str__(self) -> str:
        return f"nixpkgs:{self.channel}"


class GitSource(_Source):
    type: Literal["git"] = "git"
    url: str
    rev: str | None = None
    ref: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"(https?|ssh|git|file)://[^\s\0]{1,2000}", value):
            raise ValueError(f"invalid git URL {value[:100]!r}")
        return value

    @field_validator("rev")
    @classmethod
    def _rev(cls, value: str | None) -> str | None:
        if value is not None and not _COMMIT.fullmatch(value):
            raise ValueError("rev must be a 40-hex commit")
        return value

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        if value is not None and (not _REF.fullmatch(value) or ".." in value):
            raise ValueError(f"invalid git ref {value[:100]!r}")
        return value

    @property
    def pinned(self) -> bool:
        return self.rev is not None

    def __str__(self) -> str:
        revision = self.rev or self.ref
        return f"git:{self.url}" + (f"#{revision}" if revision else "")


PackageSource = Annotated[PathSource | NixpkgsSource | GitSource, Field(discriminator="type")]


@functools.cache
def _adapter() -> TypeAdapter[PathSource | NixpkgsSource | GitSource]:
    """Built on first use, like the models (``defer_build``)."""
    return TypeAdapter(PackageSource)


def parse_source(value: str | dict[str, Any]) -> PathSource | NixpkgsSource | GitSource:
    """Parse the text form or the structured (NixImage ``spec.packageSource``) form."""
    try:
        if isinstance(value, dict):
            return _adapter().validate_python(value)
        return _adapter().validate_python(_from_text(value))
    except ValidationError as exc:
        problems = "; ".join(err["msg"] for err in exc.errors())
        raise InvalidInput(f"invalid package source {str(value)[:200]!r}: {problems}") from exc


def _from_text(text: str) -> dict[str, Any]:
    if text.startswith("/"):
        return {"type": "path", "path": text}
    kind, sep, rest = text.partition(":")
    if not sep:
        raise InvalidInput(
            f"invalid package source {text[:200]!r}: expected path:/dir, nixpkgs:<channel|commit>"
            " or git:<url>#<rev|ref>"
        )
    if kind == "path":
        path, _, nar_hash = rest.partition("#")
        return {"type": "path", "path": path, "narHash": nar_hash or None}
    if kind == "nixpkgs":
        return {"type": "nixpkgs", "channel": rest}
    if kind == "git":
        url, _, revision = rest.partition("#")
        if revision and _COMMIT.fullmatch(revision):
            return {"type": "git", "url": url, "rev": revision}
        return {"type": "git", "url": url, "ref": revision or None}
    raise InvalidInput(f"unknown package source kind {kind[:40]!r} (path, nixpkgs or git)")
