"""specs: a NixImage body → the builder's image spec and build key, with no Nix at hand."""

from __future__ import annotations

import pytest
from operator_samples import NAR_HASH, OTHER_HASH, PKGS, SOURCE, body, settings, sources, target

import niximage_cli as cli
from niximage_builder import commands, nixcli
from niximage_core import imagespec
from niximage_core.errors import InvalidInput
from niximage_operator import podspec, specs


def test_the_key_is_the_builders_key_for_the_same_inputs() -> None:
    resolved = target(packages=("jq", "bash"), arch="arm64", format="docker")
    builder_spec = imagespec.make_spec(
        ["bash", "jq"], specs.sources.parse_source(SOURCE), arch="arm64", format="docker"
    )
    assert resolved.key == builder_spec.build_key()
    assert resolved.spec.packages == ("bash", "cacert", "iana-etc", "jq")


def test_the_builder_pods_command_line_computes_the_same_key() -> None:
    """Parse the pod's command with the builder's own CLI: it must land on our key."""
    resolved = target(packages=("python3.pkgs.requests", "jq"), compression="zstd", tag="x")
    command = podspec.builder_command(resolved, settings())
    args = cli.build_parser().parse_args(command[1:])
    spec, tag = commands._build_target(args, nixcli.NixSettings())
    assert tag is None  # the operator records tags itself: one pod serves many names
    assert spec.build_key() == resolved.key


def test_package_order_and_defaults_do_not_change_the_key() -> None:
    one = target(packages=("jq", "bash"))
    two = target(packages=("bash", "jq"), arch="amd64", tag="other", format="oci")
    assert one.key == two.key
    assert target(packages=("jq", "bash"), arch="arm64").key != one.key


def test_target_carries_identity_and_tag() -> None:
    resolved = target(name="web", namespace="team-b", generation=7, tag="1.2")
    assert (resolved.namespace, resolved.name, resolved.generation) == ("team-b", "web", 7)
    assert resolved.repository == "team-b/web"
    assert resolved.tag == "1.2" and resolved.pinned


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"packages": []}, "spec.packages"),
        ({"packages": ["jq", "jq"]}, "must not repeat"),
        ({"packages": ["x${y}"]}, "invalid package name"),
        ({"packages": ["jq"], "tag": "no/slash"}, "invalid tag"),
        ({"packages": ["jq"], "arch": "riscv"}, "spec.arch"),
        ({"packages": ["jq"], "surprise": 1}, "spec.surprise"),
        ({"packages": ["jq"], "packageSource": {"type": "path", "path": "/x"}}, "not available"),
        ({"packages": ["jq"], "packageSource": {"type": "svn", "url": "x"}}, "packageSource"),
    ],
)
def test_invalid_specs_say_what_is_wrong(spec: dict[str, object], message: str) -> None:
    obj = body()
    obj["spec"] = spec
    with pytest.raises(InvalidInput, match=message.replace("$", r"\$")):
        specs.resolve(obj, sources())


def test_a_configured_path_is_pinned_for_the_builder() -> None:
    resolved = specs.resolve(body(packageSource={"type": "path", "path": PKGS}), sources())
    assert str(resolved.spec.source) == SOURCE
    assert resolved.key == target().key  # same as the default, which is that path


def test_a_path_pinned_to_another_hash_is_refused() -> None:
    obj = body(packageSource={"type": "path", "path": PKGS, "narHash": OTHER_HASH})
    with pytest.raises(InvalidInput, match="does not match the builders' copy"):
        specs.resolve(obj, sources())


def test_extra_paths_and_remote_sources() -> None:
    extra = f"path:/srv/other#{OTHER_HASH}"
    configured = sources(extra)
    resolved = specs.resolve(body(packageSource={"type": "path", "path": "/srv/other"}), configured)
    assert str(resolved.spec.source) == extra
    commit = "a" * 40
    pinned = specs.resolve(body(packageSource={"type": "nixpkgs", "channel": commit}), configured)
    assert pinned.pinned and str(pinned.spec.source) == f"nixpkgs:{commit}"
    moving = {"type": "nixpkgs", "channel": "nixos-24.05"}
    channel = specs.resolve(body(packageSource=moving), configured)
    assert not channel.pinned
    git = {"type": "git", "url": "https://example.org/pkgs.git", "rev": commit}
    assert specs.resolve(body(packageSource=git), configured).pinned


def test_a_git_source_with_rev_and_ref_is_ambiguous_on_the_command_line() -> None:
    git = {"type": "git", "url": "https://example.org/p.git", "rev": "a" * 40, "ref": "main"}
    with pytest.raises(InvalidInput, match="ambiguous"):
        specs.resolve(body(packageSource=git), sources())


@pytest.mark.parametrize(
    ("default", "extra", "message"),
    [
        (f"path:{PKGS}", (), "is not pinned"),
        (SOURCE, ("nixpkgs:nixos-24.05",), "is not a path"),
        (SOURCE, ("path:relative",), "absolute path"),
    ],
)
def test_configuration_errors(default: str, extra: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        specs.PackageSources.configure(default, extra)


def test_an_unpinned_channel_may_be_the_default() -> None:
    configured = specs.PackageSources.configure("nixpkgs:nixos-24.05")
    assert not specs.resolve(body(), configured).pinned
    assert NAR_HASH not in str(specs.resolve(body(), configured).spec.source)
