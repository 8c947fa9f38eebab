"""Root listings in storage: the names and kinds of a requested package's tree, kept for the
top layer, so that a build from a binary cache never fetches an unchanged root's NAR just
to link its files into the symlink forest (a bumped jq changes the top layer, not cacert).

``listings/<store path hash>``: zlib-compressed JSON of ``[relative name, is directory]``
pairs. A store path never changes, so a record never does either; one that does not read
back is ignored and written again. gc leaves ``listings/`` alone (a few kB per package).

Imports tarball entries, toplayer's ``Listing`` type and the storage interface.
"""

from __future__ import annotations

import json
import zlib

from niximage_builder.tarball import Entry, PackError
from niximage_builder.toplayer import Listing
from niximage_core.errors import InvalidInput
from niximage_core.storage.base import Storage, check_key

FORMAT = 1


def listing_key(root: str) -> str:
    # The hash part alone: names may hold characters storage keys do not ("gtk+3").
    return check_key(f"listings/{root.rpartition('/')[2][:32]}")


def encode(root: str, entries: list[Entry] | tuple[Entry, ...]) -> bytes:
    own = root.lstrip("/")
    pairs = [[e.name[len(own) :], e.kind == "dir"] for e in entries]
    return zlib.compress(json.dumps({"format": FORMAT, "root": root, "entries": pairs}).encode())


def decode(root: str, data: bytes) -> list[Entry] | None:
    """The entries a listing record gives (non-directories as symlinks: the forest needs
    only names and kinds), or None when it is not a record of ``root``."""
    try:
        doc = json.loads(zlib.decompress(data))
        if doc.get("format") != FORMAT or doc.get("root") != root:
            return None
        own = root.lstrip("/")
        return [
            Entry.directory(own + rest, 0o555) if is_dir else Entry.symlink(own + rest, root)
            for rest, is_dir in doc["entries"]
            if isinstance(rest, str) and (rest == "" or rest.startswith("/"))
        ]
    except (zlib.error, ValueError, TypeError, KeyError, AttributeError, PackError):
        return None


def through_storage(storage: Storage, listing: Listing) -> Listing:
    """``listing``, with what storage holds first and what it lacks written back."""

    def stored(root: str) -> list[Entry]:
        try:
            raw = storage.read(listing_key(root))
        except InvalidInput:
            raw = None
        known = decode(root, raw) if raw is not None else None
        if known is not None:
            return known
        entries = list(listing(root))
        storage.write(listing_key(root), encode(root, entries))
        return entries

    return stored
