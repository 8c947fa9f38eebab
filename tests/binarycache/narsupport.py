"""NAR archives and signed narinfo written by the tests (a NAR writer in a few lines, after
Nix's ``dumpPath``), for the parser's and the signature check's edge cases."""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from niximage_builder.binarycache import nixbase32

Tree = bytes | tuple[str, bytes] | dict[str, "Tree"]
"""bytes: a file; ("x", bytes): an executable; ("->", target): a symlink; dict: a directory."""


def nar_string(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


def nar_node(tree: Tree) -> bytes:
    parts = [b"(", b"type"]
    if isinstance(tree, bytes):
        parts += [b"regular", b"contents", tree]
    elif isinstance(tree, tuple) and tree[0] == "x":
        parts += [b"regular", b"executable", b"", b"contents", tree[1]]
    elif isinstance(tree, tuple):
        parts += [b"symlink", b"target", tree[1]]
    else:
        out = b"".join(nar_string(p) for p in [*parts, b"directory"])
        for name in sorted(tree, key=str.encode):
            out += b"".join(nar_string(p) for p in (b"entry", b"(", b"name", name.encode()))
            out += nar_string(b"node") + nar_node(tree[name]) + nar_string(b")")
        return out + nar_string(b")")
    return b"".join(nar_string(p) for p in [*parts, b")"])


def nar(tree: Tree) -> bytes:
    return nar_string(b"nix-archive-1") + nar_node(tree)


class Signer:
    """A Nix binary cache key pair (``name:base64`` like nix-store's keys)."""

    def __init__(self, name: str = "test-cache-1") -> None:
        self.name = name
        self._key = Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public = f"{name}:{base64.b64encode(raw).decode()}"

    def sign(self, fingerprint: bytes) -> str:
        return f"{self.name}:{base64.b64encode(self._key.sign(fingerprint)).decode()}"


def narinfo_text(
    store_path: str,
    data: bytes,
    references: list[str],
    signer: Signer | None,
    url: str = "nar/x.nar",
    compression: str = "none",
    file_data: bytes | None = None,
) -> str:
    nar_hash = "sha256:" + nixbase32.encode(hashlib.sha256(data).digest())
    served = data if file_data is None else file_data
    refs = sorted(references)
    lines = [
        f"StorePath: {store_path}",
        f"URL: {url}",
        f"Compression: {compression}",
        f"FileHash: sha256:{nixbase32.encode(hashlib.sha256(served).digest())}",
        f"FileSize: {len(served)}",
        f"NarHash: {nar_hash}",
        f"NarSize: {len(data)}",
        f"References: {' '.join(r.rpartition('/')[2] for r in refs)}",
    ]
    if signer is not None:
        fingerprint = f"1;{store_path};{nar_hash};{len(data)};{','.join(refs)}".encode()
        lines.append(f"Sig: {signer.sign(fingerprint)}")
    return "\n".join(lines) + "\n"
