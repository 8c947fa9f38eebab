"""Revision links ``revisions/<repository>/_manifests/<hex>``: every manifest a repository
has been tagged with. ``layout.record_tag`` writes them, the registry reads them to scope
blobs to repositories, and gc deletes those whose manifest is gone.

Imports digest, errors, reference and storage's interface only, so gc and layout can share
it without importing each other.
"""

from __future__ import annotations

from niximage_core import reference
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_core.storage.base import Storage, check_key

REVISIONS_ROOT = "revisions/"
REVISIONS_DIR = "_manifests"


def revision_prefix(repository: str) -> str:
    """``revisions/<repository>/_manifests/``: the manifests ``repository`` has had a tag on.

    Distribution's repository links: a pull by digest of an image whose tag has moved on
    still works, and only under repositories that had it. Not a gc root (an old revision
    lives only while something else keeps it); gc deletes links whose manifest is gone.
    """
    reference.check_repository(repository)
    return f"{REVISIONS_ROOT}{repository}/{REVISIONS_DIR}/"


def revision_path(repository: str, digest: Digest) -> str:
    return check_key(revision_prefix(repository) + digest.hex)


def revision_digest(key: str) -> Digest | None:
    """The manifest digest a revision link names (its key's last part), or None."""
    head, _, hex_ = key.rpartition("/")
    if not head.endswith("/" + REVISIONS_DIR):
        return None
    try:
        return Digest.parse(f"sha256:{hex_}")
    except InvalidInput:
        return None


def list_revisions(storage: Storage, repository: str) -> list[Digest]:
    prefix = revision_prefix(repository)
    found = (revision_digest(key) for key in storage.list(prefix))
    return [digest for digest in found if digest is not None]
