"""Tar entries as values: ``Entry`` (a directory, symlink or file to pack) and ``PackError``.

Pure; imports errors only. Every other tarball module builds on these two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from niximage_core.errors import NixImageError

EntryKind = Literal["dir", "file", "symlink"]

_KINDS = frozenset(get_args(EntryKind))


class PackError(NixImageError):
    """A path cannot be packed: missing, unreadable, an unsupported file type, or changed
    while it was being read. Not transient: a Nix store path does not heal itself."""

    kind = "PackFailed"


def _valid_name(name: str) -> bool:
    """Relative, no empty, ``.`` or ``..`` part, no NUL (string tests only: this is hot)."""
    wrapped = f"/{name}/"
    return not (
        not name
        or name[0] == "/"
        or name[-1] == "/"
        or "//" in name
        or "\0" in name
        or "/./" in wrapped
        or "/../" in wrapped
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """One tar entry: a directory, a symlink, or a file whose bytes come from ``source``
    (a path read while packing, or a region of it) or ``data`` (synthetic content, e.g. a
    generated file)."""

    name: str
    """Relative path in the layer, no leading or trailing slash: ``nix/store/<hash>-x/bin``."""
    kind: EntryKind
    mode: int
    """Permission bits, including setuid/setgid/sticky (``0o1777`` for ``tmp``)."""
    size: int = 0
    target: str = ""
    """Symlink target, stored verbatim (absolute targets stay absolute)."""
    source: str | None = None
    data: bytes | None = None
    offset: int | None = None
    """Where the contents start in ``source`` when it holds more than this file (a spooled
    NAR); None: ``source`` is the file itself, of exactly ``size`` bytes."""

    def __post_init__(self) -> None:
        if not _valid_name(self.name):
            raise PackError(f"invalid tar entry name {self.name[:200]!r}")
        if self.kind not in _KINDS or not 0 <= self.mode <= 0o7777:
            raise PackError(f"{self.name}: invalid entry kind {self.kind!r} or mode {self.mode:o}")
        if self.kind == "symlink" and not self.target:
            raise PackError(f"{self.name}: a symlink needs a target")
        if self.kind == "file" and (self.source is None) == (self.data is None):
            raise PackError(f"{self.name}: a file needs exactly one of source and data")
        if self.offset is not None and (self.source is None or self.offset < 0):
            raise PackError(f"{self.name}: an offset needs a source")
        if self.data is not None and self.size != len(self.data):
            raise PackError(f"{self.name}: size {self.size} but {len(self.data)} bytes of data")

    @classmethod
    def directory(cls, name: str, mode: int = 0o755) -> Entry:
        return cls(name, "dir", mode)

    @classmethod
    def symlink(cls, name: str, target: str) -> Entry:
        """Symlinks are stored with mode 0777, as Linux reports them."""
        return cls(name, "symlink", 0o777, target=target)

    @classmethod
    def file(cls, name: str, source: str, size: int, mode: int = 0o444) -> Entry:
        return cls(name, "file", mode, size=size, source=source)

    @classmethod
    def inline(cls, name: str, data: bytes, mode: int = 0o444) -> Entry:
        return cls(name, "file", mode, size=len(data), data=data)
