"""The niximage error tree. Pure; imports nothing of ours.

Every error says whether retrying can help (``transient``), so the CLI, the registry
and the operator translate them in one place each.
"""

from __future__ import annotations


class NixImageError(Exception):
    """Base of all niximage errors."""

    transient = False
    kind = "Error"


class InvalidInput(NixImageError):
    """The user's input is malformed (bad package name, digest, reference, spec)."""

    kind = "InvalidSpec"


class PackagesNotFound(NixImageError):
    """Some requested packages do not exist in the package source."""

    kind = "MissingPackages"

    def __init__(self, names: list[str]) -> None:
        self.names = sorted(set(names))
        super().__init__("packages not found: " + ", ".join(self.names))


class NixFailure(NixImageError):
    """Nix failed; ``kind`` is EvalError or BuildFailed; ``log`` is Nix's stderr tail.
    ``transient``: Nix could not reach the network (a download, a git fetch), so the same
    spec may well succeed later."""

    def __init__(self, kind: str, message: str, log: str = "", transient: bool = False) -> None:
        self.kind = kind
        self.log = log
        self.transient = transient
        super().__init__(message)


class SubstituteError(NixImageError):
    """A binary cache could not give a store path as promised. ``kind``: CacheUnreachable
    (transient), UntrustedPath (no trusted signature, or one that does not match),
    CorruptCache (a malformed narinfo, or a NAR whose size or hash is not the narinfo's)."""

    def __init__(self, kind: str, message: str, transient: bool = False) -> None:
        self.kind = kind
        self.transient = transient
        super().__init__(message)


class NixTimeout(NixImageError):
    """Nix did not finish within the wall-clock limit; its process group was killed."""

    kind = "Timeout"
    transient = True


class NixMissing(NixImageError):
    """The Nix binaries are not installed or not on PATH."""

    kind = "NixMissing"


class StorageError(NixImageError):
    """The storage backend failed or is unreachable. Retrying may help."""

    kind = "StorageError"
    transient = True


class NotFound(NixImageError):
    """A blob, tag or metadata object does not exist in storage."""

    kind = "NotFound"
