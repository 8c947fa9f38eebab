"""Which NixImage a tag belongs to, and removing the tags whose NixImage is gone.

Imports the builder's build and storage modules; never kopf or the API client (the sweep
is handed the set of live NixImages). NixImages carry no finalizer, so deleting one, its
namespace, or uninstalling the operator first never waits for the operator. Instead the
operator records, before it writes a tag, whose it is:

    owners/<namespace>/<name>/<uid>/<tag>      (empty)

and removes a tag when it sees its NixImage deleted, or later, when a sweep finds owner
records whose NixImage (by uid) no longer exists: the deletions it missed while it was
away. A tag goes only when no other owner record names it (a NixImage deleted and created
again under the same name owns the same tag under a new uid).

Safety of the sweep: owner records are listed *before* the live NixImages, so a record
whose uid the list lacks belonged to a NixImage that existed and was deleted (a NixImage
created later is not among the records listed). Recording and releasing run under one
lock (the claim only, not the tagging), and one operator is active at a time, so "no other
owner names this tag, delete it" is one step against every writer of owner records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from niximage_core import layout
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_core.result import BuildResult
from niximage_core.storage.base import Storage, check_key

PREFIX = "owners/"
_lock = threading.Lock()
logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Owner:
    """NixImage ``namespace/name`` (by uid) owns ``<namespace>/<name>:<tag>``."""

    namespace: str
    name: str
    uid: str
    tag: str

    @property
    def repository(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.namespace}/{self.name}/{self.uid}/{self.tag}"

    @classmethod
    def parse(cls, key: str) -> Owner | None:
        parts = key.removeprefix(PREFIX).split("/")
        return cls(*parts) if key.startswith(PREFIX) and len(parts) == 4 else None


def owners(storage: Storage, prefix: str = PREFIX) -> list[Owner]:
    """The owner records under ``prefix``; a key that names no valid tag is skipped."""
    found = (Owner.parse(key) for key in storage.list(prefix))
    return sorted(owner for owner in found if owner is not None and _valid(owner))


def record(storage: Storage, owner: Owner, result: BuildResult) -> None:
    """Claim the tag, then point it at the result (``layout.record_tag``) unless it does."""
    # Only the claim needs the lock: a release that lists the owners after it sees it
    # and keeps the tag; one that listed them before has deleted the tag already, and the
    # tag written below stands. Tagging (which touches every blob) runs unlocked.
    with _lock:
        storage.write(check_key(owner.key), b"")
    if layout.read_tag(storage, owner.repository, owner.tag) != _digest(result):
        layout.record_tag(storage, owner.repository, owner.tag, result)


def release(storage: Storage, owner: Owner) -> bool:
    """Drop the claim (of a valid ``owner``); delete the tag unless another owner record
    names it. Returns whether the tag was deleted."""
    with _lock:
        others = [
            other
            for other in owners(storage, f"{PREFIX}{owner.namespace}/{owner.name}/")
            if other.tag == owner.tag and other.uid != owner.uid
        ]
        if not others:
            storage.delete(layout.tag_path(owner.repository, owner.tag))
        storage.delete(owner.key)
        return not others


def forget(storage: Storage, namespace: str, name: str, uid: str, tags: Iterable[str]) -> None:
    """A NixImage was deleted: release every tag it owned (and, for records from before
    owner records, the tags its spec and status name)."""
    claimed = set(owners(storage, f"{PREFIX}{namespace}/{name}/{uid}/"))
    claimed.update(Owner(namespace, name, uid, tag) for tag in tags)
    for owner in sorted(claimed):
        if _valid(owner):
            release(storage, owner)


def sweep(storage: Storage, live_uids: Callable[[], set[str]]) -> list[Owner]:
    """Release the tags of NixImages that no longer exist; returns what was released."""
    recorded = owners(storage)  # first: see the module docstring
    if not recorded:
        return []
    live = live_uids()
    gone = [owner for owner in recorded if owner.uid not in live]
    for owner in gone:
        release(storage, owner)
    if gone:
        logger.info(
            "released %d tag(s) of deleted NixImages: %s",
            len(gone),
            ", ".join(f"{o.repository}:{o.tag}" for o in gone[:10]),
        )
    return gone


def _valid(owner: Owner) -> bool:
    try:
        layout.tag_path(owner.repository, owner.tag)
        check_key(owner.key)
    except InvalidInput:
        return False
    return True


def _digest(result: BuildResult) -> Digest | None:
    return Digest.parse(result.manifestDigest) if result.manifestDigest else None
