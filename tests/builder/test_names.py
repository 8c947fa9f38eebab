"""Package-name grammar, Nixery-style image names and hostile strings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from niximage_core import names
from niximage_core.errors import InvalidInput


@pytest.mark.parametrize(
    "name", ["jq", "python3.pkgs.requests", "1password", "gtk+", "iana-etc", "_1hello", "Xhello"]
)
def test_valid_names(name: str) -> None:
    assert names.check_package_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ('a"b', "may only contain"),
        ("a b", "may only contain"),
        ("${pkgs.x}", "may only contain"),
        ("a..b", "empty attribute"),
        (".a", "empty attribute"),
        ("a.", "empty attribute"),
        ("a/b", "may only contain"),
        ("", "empty"),
        ("x" * 201, "longer than"),
        ("a\nb", "may only contain"),
        ("a'b", "may only contain"),
        ("(import /etc/passwd)", "may only contain"),
        (".".join(["a"] * 9), "more than"),
    ],
)
def test_hostile_names_are_rejected_with_the_name(name: str, why: str) -> None:
    with pytest.raises(InvalidInput) as info:
        names.check_package_name(name)
    assert why in str(info.value)
    assert repr(name[:20])[1:-1][:10] in str(info.value)


@given(st.text(max_size=300))
def test_any_accepted_name_is_nix_inert(text: str) -> None:
    """Whatever passes the grammar cannot form Nix syntax or a path."""
    try:
        names.check_package_name(text)
    except InvalidInput:
        return
    assert not set(text) & set("\"'$`{}()[];/\\ \t\n\0:=<>#*?@!,&|~")
    assert ".." not in text and not text.startswith(".") and not text.endswith(".")
    assert 0 < len(text) <= names.MAX_NAME_LENGTH


def test_normalise_adds_sorts_dedups() -> None:
    assert names.normalise_packages(["jq", "bash", "jq"]) == ("bash", "cacert", "iana-etc", "jq")


@given(st.lists(st.sampled_from(["jq", "bash", "htop", "git", "python3.pkgs.six"]), max_size=8))
def test_normalise_ignores_order_and_duplicates(packages: list[str]) -> None:
    assert names.normalise_packages(packages) == names.normalise_packages(sorted(set(packages)))


@pytest.mark.parametrize(
    ("image", "packages", "arch"),
    [
        ("jq", ("jq",), "amd64"),
        ("shell", names.SHELL_PACKAGES, "amd64"),
        ("shell/git/htop", (*names.SHELL_PACKAGES, "git", "htop"), "amd64"),
        ("arm64/shell/jq", (*names.SHELL_PACKAGES, "jq"), "arm64"),
        ("shell/arm64", names.SHELL_PACKAGES, "arm64"),
        ("jq/shell", ("jq", "shell"), "amd64"),  # only the leading run is meta
        ("htop/arm64", ("htop", "arm64"), "amd64"),
        ("multiarch/jq", ("jq",), "amd64,arm64"),
        ("shell/multiarch/jq", (*names.SHELL_PACKAGES, "jq"), "amd64,arm64"),
        ("jq/multiarch", ("jq", "multiarch"), "amd64"),
    ],
)
def test_image_names(image: str, packages: tuple[str, ...], arch: str) -> None:
    parsed = names.parse_image_name(image)
    assert parsed.packages == packages
    assert ",".join(parsed.architectures) == arch


def test_the_platforms_are_named_once() -> None:
    with pytest.raises(InvalidInput, match="names the platforms twice"):
        names.parse_image_name("arm64/multiarch/jq")


def test_image_name_with_bad_component() -> None:
    with pytest.raises(InvalidInput, match=r"a\.\.b"):
        names.parse_image_name("shell/a..b")
