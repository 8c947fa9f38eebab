"""Request paths under ``/v2/`` → what is asked for, validated by the spec's grammars. Pure.

The route is decided from the *end* of the path (``…/manifests/<ref>``, ``…/blobs/<digest>``,
``…/tags/list``), because a repository name has any number of ``/``-separated components
and may itself contain a component called ``blobs`` or ``manifests``. Everything else is
the repository name, checked against the spec's grammar before it is used anywhere: a name
or reference that passes cannot hold ``..``, ``%``, ``/`` where it does not belong, or
upper case, so nothing outside the storage layout can ever be named. Query strings never
reach this module (containerd's ``?ns=`` is ignored by construction).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from niximage_core import reference
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_registry.errors import Code, RegistryError

MAX_PATH = 2048
"""Longer paths are refused outright (names are ≤ 255, tags ≤ 128, digests 71)."""
_SHA512 = re.compile(r"sha512:[a-f0-9]{128}")


class Kind(enum.Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    UPLOAD = "upload"
    REFERRERS = "referrers"


@dataclass(frozen=True)
class Target:
    kind: Kind
    name: str = ""
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        return str(self.digest) if self.digest is not None else (self.tag or "")


def parse(path: str) -> Target:
    """``/v2/…`` (already percent-decoded) → a validated ``Target``; raises ``RegistryError``."""
    if len(path) > MAX_PATH:
        raise RegistryError(Code.NAME_INVALID, "request path too long")
    if path in ("/v2", "/v2/"):
        return Target(Kind.BASE)
    if not path.startswith("/v2/"):
        raise no_route()
    parts = path[len("/v2/") :].split("/")
    if len(parts) >= 3 and parts[-3:-1] == ["blobs", "uploads"]:
        return Target(Kind.UPLOAD, _name(parts[:-3]))
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return Target(Kind.TAGS, _name(parts[:-2]))
    if len(parts) >= 2:
        section, last = parts[-2], parts[-1]
        if section == "manifests":
            return _manifest(_name(parts[:-2]), last)
        if section == "blobs":
            return Target(Kind.BLOB, _name(parts[:-2]), digest=_digest(last, Code.BLOB_UNKNOWN))
        if section == "referrers":
            return Target(Kind.REFERRERS, _name(parts[:-2]), digest=_subject(last))
    raise no_route()


def no_route() -> RegistryError:
    """Unknown routes get the JSON envelope too (not a plain-text 404)."""
    return RegistryError(Code.UNSUPPORTED, "no such route in the registry API", status=404)


def _name(parts: list[str]) -> str:
    name = "/".join(parts)
    try:
        return reference.check_repository(name)
    except InvalidInput:
        raise RegistryError(
            Code.NAME_INVALID, f"invalid repository name {name[:100]!r}", {"name": name[:300]}
        ) from None


def _manifest(name: str, ref: str) -> Target:
    if reference.is_digest(ref):
        return Target(Kind.MANIFEST, name, digest=_digest(ref, Code.MANIFEST_UNKNOWN))
    try:
        return Target(Kind.MANIFEST, name, tag=reference.check_tag(ref))
    except InvalidInput:
        raise RegistryError(
            Code.TAG_INVALID, f"invalid tag {ref[:140]!r}", {"tag": ref[:300]}
        ) from None


def _subject(text: str) -> Digest | None:
    """A referrers request's subject: None for a well-formed sha512 (nothing stored has one,
    so it has no referrers: an empty answer, as the spec wants, not a 404)."""
    if _SHA512.fullmatch(text):
        return None
    return _digest(text, Code.MANIFEST_UNKNOWN)


def _digest(text: str, unknown: Code) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidInput:
        if _SHA512.fullmatch(text):
            # Well-formed, but we only ever store sha256: unknown, not invalid.
            raise RegistryError(unknown, f"unknown digest {text[:80]}…") from None
        raise RegistryError(
            Code.DIGEST_INVALID,
            f"invalid digest {text[:100]!r}: expected sha256:<64 lowercase hex>",
            {"digest": text[:300]},
        ) from None
