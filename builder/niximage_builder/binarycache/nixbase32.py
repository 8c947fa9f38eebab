"""Nix's base-32: the hash encoding of store paths, narinfo ``NarHash`` and ``FileHash``;
and ``parse_sha256`` for every form Nix writes a sha256 in.

Pure. Not RFC 4648: its own alphabet (no e, o, t, u) and the bytes read from the end, so
no library writes it; Nix's ``libutil/hash.cc`` is the reference.
"""

from __future__ import annotations

import base64
import binascii

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUES = {char: value for value, char in enumerate(ALPHABET)}


def encoded_length(size: int) -> int:
    return (size * 8 - 1) // 5 + 1


def encode(data: bytes) -> str:
    chars = []
    for n in range(encoded_length(len(data)) - 1, -1, -1):
        bit = n * 5
        index, shift = divmod(bit, 8)
        value = data[index] >> shift
        if index + 1 < len(data):
            value |= data[index + 1] << (8 - shift)
        chars.append(ALPHABET[value & 0x1F])
    return "".join(chars)


def decode(text: str, size: int) -> bytes:
    """``size`` bytes from their base-32 text; ``ValueError`` on any other input."""
    if len(text) != encoded_length(size):
        raise ValueError(f"a base-32 hash of {size} bytes has {encoded_length(size)} characters")
    out = bytearray(size)
    for position, char in enumerate(reversed(text)):
        value = _VALUES.get(char)
        if value is None:
            raise ValueError(f"{char!r} is not a Nix base-32 character")
        index, shift = divmod(position * 5, 8)
        out[index] |= (value << shift) & 0xFF
        carry = value >> (8 - shift)
        if index + 1 < size:
            out[index + 1] |= carry
        elif carry:
            raise ValueError("base-32 hash has bits beyond its size")
    return bytes(out)


def parse_sha256(text: str) -> bytes:
    """``sha256:<base32>``, ``sha256:<hex>`` or ``sha256-<base64>`` (SRI) → 32 bytes."""
    if text.startswith("sha256-"):
        try:
            raw = base64.b64decode(text[7:], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad SRI hash {text[:80]!r}") from exc
    elif text.startswith("sha256:"):
        body = text[7:]
        raw = bytes.fromhex(body) if len(body) == 64 else decode(body, 32)
    else:
        raise ValueError(f"not a sha256 hash: {text[:80]!r}")
    if len(raw) != 32:
        raise ValueError(f"not a sha256 hash: {text[:80]!r}")
    return raw
