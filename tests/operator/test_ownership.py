"""Owner records and the sweep: a NixImage's tags go with it, and only its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from niximage_core import layout
from niximage_core.storage.filesystem import FilesystemStorage
from niximage_operator import ownership
from niximage_operator.ownership import Owner
from tests.gc.support import put_image, result_for


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[FilesystemStorage]:
    store = FilesystemStorage(tmp_path / "storage")
    yield store
    store.close()


def tagged(storage: FilesystemStorage, owner: Owner) -> bool:
    return layout.read_tag(storage, owner.repository, owner.tag) is not None


def claim(storage: FilesystemStorage, owner: Owner, seed: str = "a") -> None:
    image = put_image(storage, [f"{seed}-layer"])
    ownership.record(storage, owner, result_for(image, f"key-{seed}"))


def test_record_writes_the_owner_then_the_tag(storage: FilesystemStorage) -> None:
    owner = Owner("team", "app", "uid-1", "1.0")
    claim(storage, owner)
    assert tagged(storage, owner)
    assert ownership.owners(storage) == [owner]
    assert Owner.parse(owner.key) == owner
    assert Owner.parse("owners/too/short") is None


def test_the_sweep_releases_only_the_tags_of_nix_images_gone(storage: FilesystemStorage) -> None:
    kept, gone = Owner("team", "app", "uid-1", "1.0"), Owner("team", "old", "uid-2", "latest")
    claim(storage, kept, "a")
    claim(storage, gone, "b")
    on_demand = put_image(storage, ["c-layer"], tag=("shell/jq", "latest"))
    assert ownership.sweep(storage, lambda: {"uid-1"}) == [gone]
    assert tagged(storage, kept) and not tagged(storage, gone)
    assert ownership.owners(storage) == [kept]
    # A tag no NixImage owns (on demand, niximage build --tag) is never the sweep's.
    assert layout.read_tag(storage, "shell/jq", "latest") == on_demand.manifest


def test_the_sweep_lists_owners_before_the_live_nix_images(storage: FilesystemStorage) -> None:
    """A NixImage created while the sweep runs is not taken for a deleted one."""
    existing, newcomer = Owner("team", "app", "uid-1", "1.0"), Owner("team", "new", "uid-9", "x")
    claim(storage, existing, "a")

    def live_uids() -> set[str]:
        claim(storage, newcomer, "b")  # created and tagged after the owners were listed
        return {"uid-1"}

    assert ownership.sweep(storage, live_uids) == []
    assert tagged(storage, newcomer) and tagged(storage, existing)


def test_a_name_created_again_keeps_its_tag(storage: FilesystemStorage) -> None:
    """Deleted and created again under the same name: the old uid's release leaves the tag
    the new one owns."""
    old, new = Owner("team", "app", "uid-old", "latest"), Owner("team", "app", "uid-new", "latest")
    claim(storage, old, "a")
    claim(storage, new, "b")
    assert ownership.release(storage, old) is False
    assert tagged(storage, new) and ownership.owners(storage) == [new]
    assert ownership.release(storage, new) is True
    assert not tagged(storage, new) and ownership.owners(storage) == []


def test_forget_also_takes_tags_written_before_owner_records(storage: FilesystemStorage) -> None:
    put_image(storage, ["a-layer"], tag=("team/app", "1.0"))
    claim(storage, Owner("team", "app", "uid-1", "2.0"), "b")
    ownership.forget(storage, "team", "app", "uid-1", ["1.0", "not a tag!"])
    assert layout.list_tags(storage, "team/app") == []
    assert ownership.owners(storage) == []
