"""The image's top layer: a symlink forest of the requested packages (the README's "Top layer").

Like nixpkgs' ``symlinkJoin`` (``lndir`` over every root), which Nixery builds in Nix
(as Nixery's does), but computed here from the roots' listings: a scan of the store, or
the entries of their NARs when they come from a binary cache (``contents``), with the
same result:

- Each root store path is walked in the order given. Its directories become real
  directories of the forest (mode 0755), merged with those of other roots; every file or
  symlink becomes a symlink to its absolute store path, e.g.
  ``bin/jq -> /nix/store/<hash>-jq/bin/jq``. Symlinks in a root are not followed: the forest
  points at the store symlink, which resolves at run time.
- On a conflict the first root wins: a name already taken (by a file or symlink, or a
  directory against a later file) keeps its first entry and the later one is dropped,
  with its whole subtree when it is a directory. Only directories merge with directories.
  The caller should pass roots in a canonical order (the image spec's sorted packages) so
  the winner does not depend on how the user listed them.
- A root that is not a directory (a single-file store path, or a store path that is
  itself a symlink) has nothing to merge and is skipped; it is still in its own layer.
- Always ``tmp/`` (mode 1777, empty unless a root brings a ``tmp`` directory) and
  ``usr/bin/env -> /bin/env``, so ``#!/usr/bin/env`` scripts work whenever some package
  provides ``bin/env`` (coreutils, busybox); without one the link dangles, harmlessly.
  A root's own ``usr/bin/env`` takes precedence.

Only the requested packages are merged; their dependencies live under ``/nix/store`` in the
lower layers, which is where the forest's links point.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from niximage_builder.compression import Compression
from niximage_builder.tarball import (
    Entry,
    PackedLayer,
    PackError,
    SupportsWrite,
    normalize,
    pack_entries,
    scan_paths,
)

DIR_MODE = 0o755
TMP = Entry.directory("tmp", 0o1777)
ENV_LINK = Entry.symlink("usr/bin/env", "/bin/env")


def _roots_in_order(roots: Sequence[str]) -> list[str]:
    """Absolute, normalised, first occurrence kept: the order decides conflicts."""
    seen: dict[str, None] = {}
    for root in roots:
        if not os.path.isabs(root):
            raise PackError(f"not an absolute store path: {root!r}")
        seen.setdefault(os.path.normpath(root), None)
    return list(seen)


Listing = Callable[[str], Sequence[Entry]]
"""A root store path → its entries (the root's own first, names without the leading
slash): ``local_listing`` scans the store; a binary cache lists the root's NAR."""


def local_listing(root: str) -> list[Entry]:
    """The entries of ``root`` in this machine's store."""
    own = root.lstrip("/")
    return [e for e in scan_paths([root]) if e.name == own or e.name.startswith(own + "/")]


def _merge_root(root: str, entries: Sequence[Entry], forest: dict[str, Entry]) -> None:
    """Add one root's tree to the forest; names already taken are left alone, and a name
    below one that is not a directory in the forest is dropped with it."""
    prefix = root.lstrip("/") + "/"
    for entry in sorted(entries, key=lambda e: os.fsencode(e.name)):  # parents first
        if not entry.name.startswith(prefix):
            continue  # the root itself
        name = entry.name[len(prefix) :]
        parent = name.rpartition("/")[0]
        if parent and (parent not in forest or forest[parent].kind != "dir"):
            continue  # under a name another root took, or under a dropped subtree
        if entry.kind == "dir":
            forest.setdefault(name, Entry.directory(name, DIR_MODE))
        else:
            forest.setdefault(name, Entry.symlink(name, "/" + entry.name))


def _add_env_link(forest: dict[str, Entry]) -> None:
    """``usr/bin/env -> /bin/env`` unless a root provides it or blocks ``usr``/``usr/bin``."""
    for name in ("usr", "usr/bin"):
        known = forest.setdefault(name, Entry.directory(name, DIR_MODE))
        if known.kind != "dir":
            return
    forest.setdefault(ENV_LINK.name, ENV_LINK)


def forest_entries(roots: Sequence[str], listing: Listing = local_listing) -> list[Entry]:
    """The top layer's entries for these roots, sorted (see the module doc for the rules)."""
    forest: dict[str, Entry] = {TMP.name: TMP}
    for root in _roots_in_order(roots):
        try:
            entries = listing(root)
        except OSError as err:
            raise PackError(f"{err.filename or root}: {err.strerror}") from err
        own = root.lstrip("/")
        if any(e.name == own and e.kind == "dir" for e in entries):
            _merge_root(root, entries, forest)
        # else a single file or a symlink: nothing to merge
    _add_env_link(forest)
    return normalize(forest.values())


def shell_command(roots: Sequence[str], listing: Listing = local_listing) -> list[str] | None:
    """``Cmd``: bash when a root has ``bin/bash``, else sh, else none (the README's "Top
    layer")."""
    names = {e.name for root in roots for e in listing(root)}
    for shell in ("bash", "sh"):
        if any(f"{root.lstrip('/')}/bin/{shell}" in names for root in roots):
            return [shell]
    return None


def pack_top_layer(
    roots: Sequence[str],
    sink: SupportsWrite,
    compression: Compression = "gzip",
    level: int | None = None,
    listing: Listing = local_listing,
) -> PackedLayer:
    """Pack the symlink forest of ``roots`` into ``sink``; the caller commits the digest."""
    return pack_entries(forest_entries(roots, listing), sink, compression, level)
