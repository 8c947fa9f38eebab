"""narinfo: what a binary cache says about one store path, and whether to believe it.

Pure (the ed25519 check is ``cryptography``'s). A narinfo names the path, its references and
NAR size (all the layering needs), the NAR's hash, and where the (compressed) NAR is. Nix
trusts it only when signed by a trusted key: the signature covers the fingerprint
``1;<path>;<NarHash>;<NarSize>;<references>``, so a path's contents (through the NAR hash,
checked while the NAR streams) and its references are exactly what the key's owner signed.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from niximage_builder.binarycache import nixbase32
from niximage_builder.binarycache.nixbase32 import parse_sha256
from niximage_core.errors import InvalidInput, SubstituteError

STORE_DIR = "/nix/store"
_BASENAME = re.compile(r"[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]{1,211}")
_URL = re.compile(r"[A-Za-z0-9+\-._~/=]{1,400}")
_KEY_NAME = re.compile(r"[A-Za-z0-9+\-._]{1,128}")
COMPRESSIONS = frozenset({"xz", "zstd", "bzip2", "none"})
"""What a NAR may be compressed with (Nix writes xz by default, zstd on request)."""
_MAX_NARINFO = 1 << 20


def store_path_of(basename: str) -> str:
    """``<hash>-name`` → ``/nix/store/<hash>-name``; refuses anything else."""
    if not _BASENAME.fullmatch(basename):
        raise ValueError(f"{basename[:100]!r} is not a store path name")
    return f"{STORE_DIR}/{basename}"


def hash_part(store_path: str) -> str:
    """``/nix/store/<hash>-name`` → ``<hash>``: a narinfo's file name."""
    base = store_path.rpartition("/")[2]
    if store_path != f"{STORE_DIR}/{base}" or not _BASENAME.fullmatch(base):
        raise InvalidInput(f"{store_path[:200]!r} is not a store path")
    return base[:32]


@dataclass(frozen=True)
class NarInfo:
    store_path: str
    url: str
    """The NAR's file, relative to the cache's URL."""
    compression: str
    nar_hash: bytes
    """sha256 of the uncompressed NAR."""
    nar_size: int
    references: tuple[str, ...]
    """Full store paths, sorted; the path itself included when it refers to itself."""
    file_hash: bytes | None = None
    """sha256 of the file as served, when the cache says."""
    file_size: int | None = None
    signatures: tuple[str, ...] = ()

    def fingerprint(self) -> bytes:
        """What a narinfo signature signs (Nix's ``ValidPathInfo::fingerprint``)."""
        nar_hash = "sha256:" + nixbase32.encode(self.nar_hash)
        refs = ",".join(self.references)
        return f"1;{self.store_path};{nar_hash};{self.nar_size};{refs}".encode()


def parse_narinfo(text: str, expected_path: str) -> NarInfo:
    """One narinfo; a ``SubstituteError`` (``CorruptCache``) names what is wrong with it."""
    try:
        return _parse(text, expected_path)
    except (KeyError, ValueError) as exc:
        raise SubstituteError(
            "CorruptCache", f"narinfo of {expected_path} is malformed: {exc}"
        ) from exc


def _parse(text: str, expected_path: str) -> NarInfo:
    if len(text) > _MAX_NARINFO:
        raise ValueError("over 1 MiB")
    fields: dict[str, str] = {}
    sigs: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, value = line.partition(": ")
        if not sep:
            raise ValueError(f"line {line[:80]!r} is not 'Name: value'")
        if name == "Sig":
            sigs.append(value)
        else:
            fields[name] = value
    if fields["StorePath"] != expected_path:
        raise ValueError(f"it describes {fields['StorePath'][:200]!r}")
    url = fields["URL"]
    if not _URL.fullmatch(url) or url.startswith("/") or ".." in url.split("/"):
        raise ValueError(f"URL {url[:100]!r} is not a path inside the cache")
    compression = fields.get("Compression", "bzip2")  # Nix's default when the field is absent
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression[:40]!r} is not one of {sorted(COMPRESSIONS)}")
    nar_size = int(fields["NarSize"])
    file_size = int(fields["FileSize"]) if "FileSize" in fields else None
    if nar_size < 0 or (file_size is not None and file_size < 0):
        raise ValueError("negative size")
    refs = sorted(store_path_of(ref) for ref in fields.get("References", "").split())
    return NarInfo(
        store_path=expected_path,
        url=url,
        compression=compression,
        nar_hash=parse_sha256(fields["NarHash"]),
        nar_size=nar_size,
        references=tuple(refs),
        file_hash=parse_sha256(fields["FileHash"]) if "FileHash" in fields else None,
        file_size=file_size,
        signatures=tuple(sigs),
    )


@dataclass(frozen=True)
class TrustedKeys:
    """Public keys (``name:base64``, as in Nix's ``trusted-public-keys``), by name."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def parse(cls, texts: Iterable[str]) -> TrustedKeys:
        keys: dict[str, Ed25519PublicKey] = {}
        for text in texts:
            name, _, body = text.strip().partition(":")
            try:
                raw = base64.b64decode(body, validate=True)
                if not _KEY_NAME.fullmatch(name) or len(raw) != 32:
                    raise ValueError
                keys[name] = Ed25519PublicKey.from_public_bytes(raw)
            except (ValueError, binascii.Error):
                raise InvalidInput(
                    f"trusted public key {text[:80]!r} is not 'name:base64 of 32 bytes' "
                    "(what nix-store --generate-binary-cache-key writes)"
                ) from None
        return cls(keys)

    def verify(self, info: NarInfo, cache: str) -> str:
        """The name of a trusted key that signed ``info``, or ``SubstituteError``
        (``UntrustedPath``)."""
        fingerprint = info.fingerprint()
        names = []
        for sig in info.signatures:
            name, _, body = sig.partition(":")
            names.append(name)
            key = self.keys.get(name)
            if key is None:
                continue
            try:
                key.verify(base64.b64decode(body, validate=True), fingerprint)
            except (InvalidSignature, ValueError, binascii.Error):
                raise SubstituteError(
                    "UntrustedPath",
                    f"{info.store_path} from {cache}: the signature by {name} does not match "
                    "its narinfo (NarHash, NarSize or References were altered)",
                ) from None
            return name
        signed = f"signed by {', '.join(sorted(set(names)))}" if names else "not signed"
        trusted = ", ".join(sorted(self.keys)) or "none"
        raise SubstituteError(
            "UntrustedPath",
            f"{info.store_path} from {cache} is {signed}; trusted keys: {trusted}",
        )
