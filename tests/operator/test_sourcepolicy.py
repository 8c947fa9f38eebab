"""The package source allow-list (pure): rules, defaults, messages, and the spec path."""

from __future__ import annotations

import pytest

from niximage_core.errors import InvalidInput
from niximage_core.sources import parse_source
from niximage_operator import specs
from niximage_operator.sourcepolicy import SourceNotAllowed, SourcePolicy

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAR = "sha256-" + "A" * 43 + "="
OWN = [parse_source(f"path:/opt/pkgs#{NAR}")]


@pytest.mark.parametrize(
    ("rules", "source", "allowed"),
    [
        ((), f"nixpkgs:{COMMIT}", True),
        ((), "nixpkgs:nixos-24.05", False),
        ((), f"git:https://github.com/NixOS/nixpkgs#{COMMIT}", False),
        ((), "path:/opt/pkgs", True),
        ((), f"path:/opt/pkgs#{NAR}", True),
        ((), "path:/etc", False),
        (("nixpkgs:nixos-*",), "nixpkgs:nixos-24.05", True),
        (("nixpkgs:nixos-*",), f"nixpkgs:{COMMIT}", False),  # rules replace the default
        (
            ("git:https://git.example/platform/*#{commit}",),
            f"git:https://git.example/platform/a.git#{COMMIT}",
            True,
        ),
        (
            ("git:https://git.example/platform/*#{commit}",),
            "git:https://git.example/platform/a.git#main",
            False,
        ),
        (("git:https://git.example/platform/*",), "git:https://git.example/platform.evil/x", False),
        (("git:https://git.example/*",), "git:https://git.example/x.git#main", True),
        (("nixpkgs:nixos-2?.05",), "nixpkgs:nixos-24.05", True),
        (("nixpkgs:nixos.24",), "nixpkgs:nixosx24", False),  # "." is literal
    ],
)
def test_rules(rules: tuple[str, ...], source: str, allowed: bool) -> None:
    policy = SourcePolicy.configure(rules, OWN)
    if allowed:
        policy.check(parse_source(source))
    else:
        with pytest.raises(SourceNotAllowed, match="is not allowed: the operator allows"):
            policy.check(parse_source(source))


@pytest.mark.parametrize("rule", ["nixpkgs", "http://x", "git:", "git:a b", "ftp:x"])
def test_malformed_rules_are_refused_at_start(rule: str) -> None:
    with pytest.raises(InvalidInput, match="is not <kind>:<pattern>"):
        SourcePolicy.configure([rule])


def test_the_spec_path_says_source_not_allowed_and_names_the_rules() -> None:
    sources = specs.PackageSources.configure(f"path:/opt/pkgs#{NAR}", allowed=["nixpkgs:nixos-*"])
    body = {
        "apiVersion": "niximage.dev/v1alpha1",
        "kind": "NixImage",
        "metadata": {"name": "a", "namespace": "team"},
        "spec": {"packages": ["jq"], "packageSource": {"type": "git", "url": "https://evil/x"}},
    }
    with pytest.raises(SourceNotAllowed) as refused:
        specs.resolve(body, sources)
    assert refused.value.kind == "SourceNotAllowed"
    assert "spec.packageSource: package source git:https://evil/x is not allowed" in str(
        refused.value
    )
    assert "nixpkgs:nixos-*, path:/opt/pkgs" in str(refused.value)
    # The default source needs no rule, and neither does an offered path.
    del body["spec"]["packageSource"]
    assert specs.resolve(body, sources).spec.source.type == "path"
    body["spec"]["packageSource"] = {"type": "nixpkgs", "channel": "nixos-24.05"}
    assert specs.resolve(body, sources).spec.source.type == "nixpkgs"
