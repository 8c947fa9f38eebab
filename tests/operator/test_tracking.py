"""spec.follow's pure parts (tracking) and its git adapter against real repositories."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from niximage_core.errors import InvalidInput
from niximage_core.resource import Follow
from niximage_core.sources import GitSource, NixpkgsSource, PathSource, parse_source
from niximage_operator import gitremote, tracking

COMMIT = "a" * 40
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("source", "reference"),
    [
        ("git:https://h/r.git#main", tracking.Reference("https://h/r.git", "main")),
        ("git:https://h/r.git", tracking.Reference("https://h/r.git", "HEAD")),
        ("nixpkgs:nixos-24.05", tracking.Reference(tracking.NIXPKGS_GIT, "refs/heads/nixos-24.05")),
        (f"git:https://h/r.git#{COMMIT}", None),
        (f"nixpkgs:{COMMIT}", None),
        ("path:/pkgs", None),
    ],
)
def test_which_sources_move(source: str, reference: tracking.Reference | None) -> None:
    assert tracking.moving_reference(parse_source(source)) == reference


def test_a_revision_pins_the_source() -> None:
    assert tracking.pinned(parse_source("git:https://h/r.git#main"), COMMIT) == GitSource(
        url="https://h/r.git", rev=COMMIT
    )
    assert tracking.pinned(parse_source("nixpkgs:nixos-24.05"), COMMIT) == NixpkgsSource(
        channel=COMMIT
    )
    with pytest.raises(InvalidInput):
        tracking.pinned(PathSource(path="/pkgs"), COMMIT)


def test_what_cannot_be_followed_is_refused_with_the_reason() -> None:
    moving = parse_source("git:https://h/r.git#main")
    tracking.check(Follow(interval="5m"), moving, 60)
    with pytest.raises(InvalidInput, match="below the operator's minimum of 1m"):
        tracking.check(Follow(interval="30s"), moving, 60)
    with pytest.raises(InvalidInput, match="does not move"):
        tracking.check(Follow(), parse_source(f"git:https://h/r.git#{COMMIT}"), 60)
    tracking.check(Follow(enabled=False, interval="1s"), moving, 60)  # off: nothing to check


def test_due_after_the_interval_or_for_another_source() -> None:
    source = parse_source("git:https://h/r.git#main")
    checked = {"source": str(source), "checkedAt": "2026-12-04T11:59:00Z"}
    assert not tracking.due(checked, source, 120, NOW)
    assert tracking.due(checked, source, 60, NOW)
    assert tracking.due({}, source, 3600, NOW)
    assert tracking.due({**checked, "source": "git:https://h/r.git#dev"}, source, 3600, NOW)
    assert tracking.due({**checked, "checkedAt": "yesterday"}, source, 3600, NOW)
    assert tracking.parse_time("2026-12-04T11:59:00Z") == NOW - timedelta(minutes=1)


def test_history_is_newest_first_once_per_revision_and_bounded() -> None:
    one = {"revision": "1" * 40, "outcome": "Succeeded", "digest": "sha256:1"}
    two = {"revision": "2" * 40, "outcome": "Failed"}
    history = tracking.with_entry([], one, 2)
    assert history == [one]
    assert tracking.with_entry(history, one, 2) is None  # said already
    history = tracking.with_entry(history, two, 2)
    assert history == [two, one]
    three = {"revision": "3" * 40, "outcome": "Succeeded", "digest": "sha256:3"}
    assert tracking.with_entry(history, three, 2) == [three, two]
    retried = {"revision": "2" * 40, "outcome": "Succeeded", "digest": "sha256:2"}
    assert tracking.with_entry([two, one], retried, 5) == [retried, one]


LISTING = (
    f"{'1' * 40}\tHEAD\n{'2' * 40}\trefs/heads/main\n{'3' * 40}\trefs/tags/v1\n"
    f"{'4' * 40}\trefs/tags/v1^{{}}\n{'5' * 40}\trefs/remotes/origin/dev\n"
)


@pytest.mark.parametrize(
    ("ref", "commit"),
    [("HEAD", "1"), ("main", "2"), ("refs/heads/main", "2"), ("v1", "4"), ("dev", "5"),
     ("nope", None)],
)  # fmt: skip
def test_choosing_the_commit_of_a_ref(ref: str, commit: str | None) -> None:
    assert gitremote.choose(LISTING, ref) == (commit * 40 if commit else None)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def test_resolving_a_real_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    (repo / "f").write_text("1")
    git(repo, "add", "f")
    git(repo, "commit", "--quiet", "-m", "one")
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "-a", "v1", "-m", "v1")
    url = f"file://{repo}"
    assert gitremote.resolve(tracking.Reference(url, "main")) == first
    assert gitremote.resolve(tracking.Reference(url, "v1")) == first  # the tag's commit
    assert gitremote.resolve(tracking.Reference(url, "HEAD")) == first
    (repo / "f").write_text("2")
    git(repo, "commit", "--quiet", "-am", "two")
    assert gitremote.resolve(tracking.Reference(url, "main")) != first
    with pytest.raises(gitremote.RevisionUnresolved, match="has no ref 'nope'"):
        gitremote.resolve(tracking.Reference(url, "nope"))
    with pytest.raises(gitremote.RevisionUnresolved, match=r"git ls-remote .* failed"):
        gitremote.resolve(tracking.Reference(f"file://{tmp_path}/missing", "main"))
    with pytest.raises(gitremote.RevisionUnresolved, match="failed"):
        gitremote.resolve(tracking.Reference("https://127.0.0.1:9/none.git", "main"), 10)
