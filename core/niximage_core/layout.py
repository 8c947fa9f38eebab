"""The storage layout every component shares: where build results and tags live, and the
two writes whose order the gc protocol depends on.

Imports digest, errors, result, storage's interface and gc; never Nix or the build
pipeline, so the registry and the operator read and write the same keys as the builder
without importing it. The layout (docs/architecture.md#storage-layout):

    builds/<build key>                         the build result (JSON), or the error
    tags/<repository>/_tags/<tag>              the manifest digest a tag points at
    tags/_pulls/<repository>/_tags/<tag>       the same, for tags on-demand pulls recorded
    revisions/<repository>/_manifests/<hex>    a manifest the repository was ever tagged with
"""

from __future__ import annotations

from collections.abc import Iterator

from niximage_core import gc, reference
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, StorageError
from niximage_core.result import BuildResult
from niximage_core.revisions import revision_path
from niximage_core.storage.base import Storage, check_key


def build_key_path(key: str) -> str:
    return check_key(f"builds/{key}")


TAGS_DIR = "_tags"
"""Between repository and tag: no repository component can be ``_tags`` (the name grammar
starts components with a letter or digit), so ``shell`` tag ``git`` and ``shell/git`` tag
``latest`` never collide, and a key is never also a directory on the filesystem backend."""


PULLS_DIR = "_pulls"
"""Under ``tags/``: the tags on-demand pulls record (``niximage serve --on-demand``), apart
from those of NixImages and ``niximage build --tag``, so that a pull of ``team/app:latest``
never claims the tag of NixImage ``app`` in namespace ``team``. No repository begins with
``_``, so the two never share a key; where both hold a tag, the NixImage's wins."""


def tag_prefix(repository: str, pulled: bool = False) -> str:
    """``tags/<repository>/_tags/`` (``tags/_pulls/…`` for pulls): one repository's tags."""
    reference.check_repository(repository)
    return f"tags/{PULLS_DIR + '/' if pulled else ''}{repository}/{TAGS_DIR}/"


def tag_path(repository: str, tag: str, pulled: bool = False) -> str:
    reference.check_tag(tag)
    return check_key(tag_prefix(repository, pulled) + tag)


def iter_tags(storage: Storage, repository: str) -> Iterator[str]:
    """The repository's tags as storage lists them: its own, then its pulls' (a tag in
    both comes twice)."""
    for pulled in (False, True):
        prefix = tag_prefix(repository, pulled)
        for key in storage.list(prefix):
            if "/" not in key[len(prefix) :]:
                yield key[len(prefix) :]


def list_tags(storage: Storage, repository: str) -> list[str]:
    """The repository's tags, both kinds, sorted (the registry's ``tags/list``)."""
    return sorted(set(iter_tags(storage, repository)))


def record_result(storage: Storage, result: BuildResult) -> bool:
    """Write ``builds/<key>``; a failure never replaces a stored success (another builder
    of the same key may have finished first). False when a success was kept."""
    path = build_key_path(result.buildKey)
    keep = _is_success if not result.ok else (lambda _current: False)
    return storage.write_unless(path, result.to_json(), keep)


def _is_success(raw: bytes) -> bool:
    try:
        return BuildResult.from_json(raw).ok
    except ValueError:
        return False


def cached_result(storage: Storage, key: str) -> BuildResult | None:
    """A stored *successful* result whose blobs all still exist, else None.

    The blobs are touched, so gc spares them for its grace period: time to tag the image.
    """
    raw = storage.read(build_key_path(key))
    if raw is None:
        return None
    try:
        result = BuildResult.from_json(raw)
    except ValueError:
        return None
    if not result.ok or result.manifestDigest is None:
        return None
    try:
        digests = gc.result_digests(result)
    except InvalidInput:
        return None
    if gc.touch_all(storage, digests):
        return None  # garbage-collected: build again
    return result


def record_tag(
    storage: Storage, repository: str, tag: str, result: BuildResult, pulled: bool = False
) -> None:
    """Point ``repository:tag`` at the result's manifest (after all its blobs exist).

    Then touches every blob of the image (rule W4 of ``gc``): if a gc removed one since the
    build, ``StorageError`` is raised and the tag is put back as it was (or deleted), so that
    a tag never names a missing blob; building again repairs the image.
    """
    if not result.ok or result.manifestDigest is None:
        raise InvalidInput("cannot tag a failed build")
    path = tag_path(repository, tag, pulled)
    previous = storage.read(path)
    storage.write(path, result.manifestDigest.encode())
    gc.checkpoint("build.tagged", key=path)
    manifest_digest, *rest = gc.result_digests(result)
    # The manifest first: gc's safety argument needs it touched before what it names.
    missing = gc.touch_all(storage, [manifest_digest]) or gc.touch_all(storage, rest)
    if not missing:
        # The image and the artifacts about it (its SBOM) become pullable by digest here.
        for digest in [manifest_digest, *_referrer_manifests(result)]:
            link = revision_path(repository, digest)
            if storage.read(link) is None:
                storage.write(link, str(digest).encode())
        return
    _put_back(storage, path, previous)
    raise StorageError(
        f"cannot tag {repository}:{tag}: blob {missing[0]} of the image was garbage-collected "
        "since it was built; build it again"
    )


def _referrer_manifests(result: BuildResult) -> list[Digest]:
    found = [*result.referrers, *(ref for p in result.platforms for ref in p.referrers)]
    return [Digest.parse(ref.manifestDigest) for ref in found]


def _put_back(storage: Storage, path: str, previous: bytes | None) -> None:
    """Restore a tag's old value if its image is whole, else delete the tag. While the tag
    named the new image the old one was unreferenced, so gc may have taken it: the restore
    is checked like any tag write (written first, then touched)."""
    try:
        old = Digest.parse(previous.decode().strip()) if previous is not None else None
    except (UnicodeDecodeError, InvalidInput):
        old = None
    if old is not None and previous is not None:
        storage.write(path, previous)
        if not gc.touch_image(storage, old):
            return
    storage.delete(path)


def read_tag(
    storage: Storage, repository: str, tag: str, with_pulls: bool = False
) -> Digest | None:
    """The digest ``repository:tag`` names: its own tag, or else, ``with_pulls`` (what the
    registry's clients see), the tag an on-demand pull recorded."""
    raw = storage.read(tag_path(repository, tag))
    if raw is None and with_pulls:
        raw = storage.read(tag_path(repository, tag, pulled=True))
    return Digest.parse(raw.decode().strip()) if raw is not None else None
