"""Content digests (``sha256:<64 hex>``): parse, validate, compute. Pure; imports errors only."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from niximage_core.errors import InvalidInput

_SHA256 = re.compile(r"sha256:[a-f0-9]{64}")


@dataclass(frozen=True, order=True)
class Digest:
    """A sha256 content digest. Only sha256 is accepted: it is all we ever write."""

    hex: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-f0-9]{64}", self.hex):
            raise InvalidInput(f"not a sha256 hex digest: {self.hex[:80]!r}")

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<hex>``; anything else (other algorithms, upper case) is invalid."""
        if not _SHA256.fullmatch(text):
            raise InvalidInput(
                f"invalid digest: {text[:100]!r} (expected sha256:<64 lowercase hex>)"
            )
        return cls(text[len("sha256:") :])

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"sha256:{self.hex}"
