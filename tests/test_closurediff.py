"""Closure diffs (pure): matched by name, versions from the SBOM, bytes and layers."""

from __future__ import annotations

from typing import Any

from niximage_core import closurediff


def sbom(*paths: tuple[str, str, str, int]) -> dict[str, Any]:
    return {
        "components": [
            {
                "name": name,
                "version": version,
                "properties": [
                    {"name": "nix:storePath", "value": path},
                    {"name": "nix:narSize", "value": str(size)},
                ],
            }
            for path, name, version, size in paths
        ]
    }


GLIBC = ("/nix/store/g-glibc", "glibc", "", 3000)
JQ16 = ("/nix/store/a-jq-1.6", "jq", "1.6", 100)
JQ17 = ("/nix/store/b-jq-1.7", "jq", "1.7", 120)
LIBJQ_OLD = ("/nix/store/c-libjq", "libjq", "", 50)
LIBJQ_NEW = ("/nix/store/d-libjq", "libjq", "", 50)
CURL = ("/nix/store/e-curl-8", "curl", "8", 400)


def test_changed_added_removed_and_rebuilt() -> None:
    change = closurediff.diff(
        sbom(GLIBC, JQ16, LIBJQ_OLD, CURL),
        sbom(GLIBC, JQ17, LIBJQ_NEW),
        [{"digest": "sha256:1", "size": 10}, {"digest": "sha256:2", "size": 20}],
        [{"digest": "sha256:1", "size": 10}, {"digest": "sha256:3", "size": 30}],
    )
    assert [(c.new.name, c.old.version, c.new.version) for c in change.changed] == [
        ("jq", "1.6", "1.7"),
        ("libjq", "", ""),
    ]
    assert change.changed[1].rebuilt and not change.changed[0].rebuilt
    assert [p.name for p in change.removed] == ["curl"] and change.added == []
    assert change.bytes_added == 120 + 50 and change.bytes_removed == 100 + 50 + 400
    assert change.layers == closurediff.Layers(reused=1, new=1, new_bytes=30)
    assert change.summary() == (
        "jq 1.6 → 1.7, libjq rebuilt, -curl 8; 170 B added, 550 B removed; "
        "1 layers reused, 1 new (30 B to pull)"
    )
    table = change.render()
    assert "~  jq" in table and "1.6" in table and "(rebuilt)" in table and "-  curl" in table
    doc = change.to_json()
    assert doc["changed"][0]["oldVersion"] == "1.6" and doc["layers"]["newBytes"] == 30


def test_the_same_closure_is_unchanged() -> None:
    change = closurediff.diff(sbom(GLIBC, JQ16), sbom(GLIBC, JQ16))
    assert change.empty and change.summary() == "closure unchanged"
    assert change.render().startswith("closure unchanged")


def test_two_paths_of_one_name_are_not_guessed_at() -> None:
    bash = ("/nix/store/h-bash-5", "bash", "5", 10)
    bash_interactive = ("/nix/store/i-bash-5", "bash", "5", 11)
    change = closurediff.diff(
        sbom(bash), sbom(bash_interactive, ("/nix/store/j-bash-5", "bash", "5", 12))
    )
    assert change.changed == [] and len(change.added) == 2 and len(change.removed) == 1


def test_components_without_a_store_path_or_with_junk_are_skipped() -> None:
    properties = [
        {"name": "nix:storePath", "value": "/nix/store/k-y"},
        {"name": "nix:narSize", "value": "many"},
    ]
    junk = {"components": [{"name": "x"}, "not a component", {"properties": properties}]}
    found = closurediff.packages(junk)
    assert list(found) == ["/nix/store/k-y"] and found["/nix/store/k-y"].nar_size == 0
    assert found["/nix/store/k-y"].name == ""
