"""crds/niximage.yaml: its shape, its validation, and its agreement with resource.py."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from apiserver import apply_defaults, cel_problems, list_type_problems, schema_problems
from kubernetes import client
from operator_harness import ROOT
from operator_samples import NAR_HASH, target

from niximage_core import names, resource
from niximage_core.errors import InvalidInput
from niximage_core.result import BuildResult
from niximage_operator import conditions, specs

JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def version(crd: dict[str, Any]) -> dict[str, Any]:
    [served] = crd["spec"]["versions"]
    return dict(served)


def test_the_crd_is_one_the_official_model_knows_field_by_field(crd: dict[str, Any]) -> None:
    """An offline check of the CRD object itself: the kubernetes client's typed model
    drops unknown fields and refuses wrong types, so an unchanged round trip means every
    field is a real CustomResourceDefinition field."""
    typed = client.V1CustomResourceDefinition.from_dict(crd)
    assert client.ApiClient().sanitize_for_serialization(typed) == crd


def test_identity_names_and_subresource(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "niximages.niximage.dev"
    assert spec["group"] == "niximage.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "NixImage" and spec["names"]["shortNames"] == ["nimg"]
    assert spec["names"]["categories"] == ["nix"]
    served = version(crd)
    assert served["name"] == "v1alpha1" and served["served"] and served["storage"]
    assert served["subresources"] == {"status": {}}


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in version(crd)["additionalPrinterColumns"]}
    assert list(columns) == ["Tag", "Arch", "Ready", "Reason", "Image", "Digest", "Age"]
    assert columns["Arch"]["jsonPath"] == ".status.arch"
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Digest"]["priority"] == 1
    assert columns["Age"]["type"] == "date"
    assert all(c.get("priority", 0) == 0 for n, c in columns.items() if n != "Digest")


def nodes(schema: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Every schema node: (path, node, inside a junctor)."""
    stack: list[tuple[str, Any, bool]] = [(path, schema, False)]
    while stack:
        where, node, junctor = stack.pop()
        if not isinstance(node, dict):
            continue
        yield where, node, junctor
        for name, sub in (node.get("properties") or {}).items():
            stack.append((f"{where}.{name}", sub, junctor))
        if isinstance(node.get("items"), dict):
            stack.append((f"{where}[]", node["items"], junctor))
        if isinstance(node.get("additionalProperties"), dict):
            stack.append((f"{where}{{}}", node["additionalProperties"], junctor))
        for key in JUNCTORS:
            branches = node.get(key)
            for branch in branches if isinstance(branches, list) else [branches]:
                stack.append((f"{where}/{key}", branch, True))


def test_the_schema_is_structural(crd_schema: dict[str, Any]) -> None:
    """Structural schema rules (CRD docs): a type everywhere outside junctors, no $ref,
    junctors without type/description/default, nothing left open."""
    for path, node, in_junctor in nodes(crd_schema):
        assert "$ref" not in node, path
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path
        if in_junctor:
            assert not {"type", "description", "default", "additionalProperties"} & set(node), path
        else:
            assert "type" in node, f"{path} has no type"


def test_every_junctor_field_is_declared_outside(crd_schema: dict[str, Any]) -> None:
    for path, node, _ in nodes(crd_schema):
        for key in JUNCTORS:
            branches = node.get(key)
            for branch in branches if isinstance(branches, list) else [branches] * bool(branches):
                assert set(branch.get("properties", {})) <= set(node["properties"]), path
                assert set(branch.get("required", [])) <= set(node["properties"]), path


def test_cel_rules_read_declared_fields_of_bounded_length(crd_schema: dict[str, Any]) -> None:
    """A rule on an undeclared field never compiles on the API server, and one that reads
    strings of unbounded length may be refused as too costly: a string a rule reads (more
    than has() it) has a maxLength or an enum (its estimated size, not the request's)."""
    field = r"\bself\.(\w+)\b(?!\()"  # self.tag, not self.contains(…)
    checked = 0
    for path, node, _ in nodes(crd_schema):
        for rule in node.get("x-kubernetes-validations") or ():
            named = re.findall(field, rule["rule"])
            assert set(named) <= set(node.get("properties") or ()), f"{path}: {rule['rule']}"
            read = [node["properties"][n] for n in re.findall(r"(?<!has\()" + field, rule["rule"])]
            read += [node] if node["type"] == "string" else []
            strings = [n for n in read if n["type"] == "string"]
            assert all("maxLength" in n or "enum" in n for n in strings), path
            assert rule.get("message"), f"{path}: {rule['rule']} says nothing"
            checked += 1
    assert checked > 10


def admit(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """What the API server would say: defaulting, then JSON schema, list types and CEL."""
    obj = copy.deepcopy(obj)
    apply_defaults(obj, schema)
    errors = [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(obj)]
    return errors + list_type_problems(obj, schema) + cel_problems(obj, schema)


def nix_image(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "niximage.dev/v1alpha1",
        "kind": "NixImage",
        "metadata": {"name": "x", "namespace": "default"},
        "spec": spec,
    }


COMMIT = "0123456789abcdef0123456789abcdef01234567"
GIT = {"type": "git", "url": "https://e.org/p.git"}
VALID = [
    {"packages": ["jq"]},
    {"packages": ["python3.pkgs.requests", "gtk+3", "_1password"], "tag": "v1.2_rc-3"},
    {"packages": ["jq"], "arch": "arm64", "format": "docker", "compression": "gzip"},
    {"packages": ["jq"], "format": "oci", "compression": "zstd"},
    {"packages": ["jq"], "packageSource": {"type": "nixpkgs", "channel": "nixos-24.05"}},
    {"packages": ["jq"], "packageSource": {**GIT, "rev": COMMIT}},
    {"packages": ["jq"], "packageSource": {"type": "path", "path": "/opt/pkgs"}},
    {
        "packages": ["jq"],
        "packageSource": {"type": "path", "path": "/opt/pkgs", "narHash": NAR_HASH},
    },
    {"packages": ["jq"], "packageSource": {"type": "nixpkgs", "channel": COMMIT}},
    {"packages": ["jq"], "packageSource": {**GIT, "ref": "release/v1.2"}},
    {"packages": ["jq"], "packageSource": GIT},
]
INVALID = [
    {"packages": []},
    {"packages": ["jq", "jq"]},
    {"packages": ["x${y}"]},
    {"packages": ["-rf"]},
    {"packages": ["a..b"]},
    {"packages": ["a.b.c.d.e.f.g.h.i"]},
    {"packages": ["jq"], "arch": "riscv64"},
    {"packages": ["jq"], "tag": ".hidden"},
    {"packages": ["jq"], "tag": "a" * 129},
    {"packages": ["jq"], "format": "tar"},
    {"packages": ["jq"], "format": "docker", "compression": "zstd"},
    {"packages": ["jq"], "packageSource": {**GIT, "rev": COMMIT, "ref": "main"}},
    {"packages": ["jq"], "packageSource": {"type": "git", "url": "ftp://e.org/p.git"}},
    {"packages": ["jq"], "packageSource": {"type": "nixpkgs"}},
    {"packages": ["jq"], "packageSource": {"type": "path", "path": "relative"}},
    {"packages": ["jq"], "packageSource": {"type": "svn", "url": "https://e.org/p"}},
    {"packages": ["jq"], "packageSource": {"type": "path", "path": "/opt/pkgs", "narHash": "x"}},
    {"packages": ["jq"], "packageSource": {**GIT, "rev": "main"}},
    {"packages": ["jq"], "packageSource": {**GIT, "ref": "-main"}},
    {"packages": ["jq"], "packageSource": {"type": "nixpkgs", "channel": "a" * 201}},
]


# The operator offers /opt/pkgs, so a spec naming it resolves; and it allows every nixpkgs
# and git source (the allow-list is test_sourcepolicy's).
OFFERED = specs.PackageSources.configure(
    f"path:/opt/pkgs#{NAR_HASH}", allowed=["nixpkgs:*", "git:*"]
)


@pytest.mark.parametrize("spec", VALID)
def test_valid_specs_pass_the_crd_and_the_operator(
    crd_schema: dict[str, Any], spec: dict[str, Any]
) -> None:
    assert admit(crd_schema, nix_image(**spec)) == []
    specs.resolve(nix_image(**spec), OFFERED)


@pytest.mark.parametrize("spec", INVALID)
def test_invalid_specs_fail_the_crd_and_the_operator(
    crd_schema: dict[str, Any], spec: dict[str, Any]
) -> None:
    obj = nix_image(**spec)
    assert admit(crd_schema, obj) != []
    with pytest.raises(InvalidInput):
        specs.resolve(obj, OFFERED)


SOURCE_MISTAKES = [
    # what a user gets wrong, and what the API server answers
    ({**GIT, "rev": COMMIT, "ref": "main"}, ["a git source names either rev or ref, not both"]),
    ({"type": "path"}, ["type path needs path (a directory the operator offers)"]),
    (
        {"type": "path", "narHash": NAR_HASH},
        ["type path needs path (a directory the operator offers)"],
    ),
    ({"type": "nixpkgs"}, ["type nixpkgs needs channel (a channel or branch name, or a commit)"]),
    ({"type": "git"}, ["type git needs url (the repository)"]),
    ({"type": "git", "rev": COMMIT}, ["type git needs url (the repository)"]),
    (
        {"type": "nixpkgs", "url": GIT["url"]},
        [
            "type nixpkgs needs channel (a channel or branch name, or a commit)",
            "url belongs to type git only",
        ],
    ),
    ({**GIT, "channel": "nixos-24.05"}, ["channel belongs to type nixpkgs only"]),
    ({**GIT, "path": "/opt/pkgs"}, ["path belongs to type path only"]),
    ({**GIT, "narHash": NAR_HASH}, ["narHash belongs to type path only"]),
    ({"type": "nixpkgs", "channel": "main", "ref": "main"}, ["ref belongs to type git only"]),
    ({"type": "path", "path": "/opt/pkgs", "rev": COMMIT}, ["rev belongs to type git only"]),
    ({"type": "path", "path": "/opt/pkgs", "url": GIT["url"]}, ["url belongs to type git only"]),
]


@pytest.mark.parametrize(("source", "messages"), SOURCE_MISTAKES)
def test_a_package_source_mistake_is_named(
    crd_schema: dict[str, Any], source: dict[str, str], messages: list[str]
) -> None:
    """Not the first oneOf branch's complaint ('Unsupported value: "git": supported
    values: "path"'): the rules the source breaks, and only them. The operator refuses
    the same sources (with no CRD installed, or one older than these rules)."""
    obj = nix_image(packages=["jq"], packageSource=source)
    assert admit(crd_schema, obj) == [f"spec.packageSource: Invalid value: {m}" for m in messages]
    with pytest.raises(InvalidInput):
        specs.resolve(obj, OFFERED)


@pytest.mark.parametrize("field", ["channel", "ref"])
def test_a_channel_or_ref_with_two_dots_is_refused(crd_schema: dict[str, Any], field: str) -> None:
    """sources.py refuses '..' in both (git does in a ref); the pattern alone allows it."""
    source = {"type": "nixpkgs"} if field == "channel" else dict(GIT)
    obj = nix_image(packages=["jq"], packageSource={**source, field: "release..1"})
    problem = f"spec.packageSource.{field}: Invalid value: {field} must not contain '..'"
    assert admit(crd_schema, obj) == [problem]
    with pytest.raises(InvalidInput):
        specs.resolve(obj, OFFERED)


def test_an_unknown_spec_field_is_pruned_or_refused(crd_schema: dict[str, Any]) -> None:
    """A real server prunes it (and warns); resource.py refuses it; the emulator keeps it
    so the strict check sees it. Either way it never reaches a build."""
    obj = nix_image(packages=["jq"], extra=True)
    assert admit(crd_schema, obj) == []
    assert schema_problems([obj], crd_schema) != []
    with pytest.raises(InvalidInput, match=r"spec\.extra"):
        resource.parse_resource(obj)


GOOD_NAMES = ["jq", "python3.pkgs.requests", "gtk+3", "_x", "a-b", "a.b.c.d.e.f.g.h", "x" * 200]
BAD_NAMES = ["", "a..b", ".a", "a.", "-a", "+a", "a b", "a/b", "x" * 201, "a.b.c.d.e.f.g.h.i", "ü"]


@pytest.mark.parametrize("name", GOOD_NAMES + BAD_NAMES)
def test_the_package_pattern_is_names_py_grammar(crd_schema: dict[str, Any], name: str) -> None:
    items = crd_schema["properties"]["spec"]["properties"]["packages"]["items"]
    by_crd = bool(re.fullmatch(items["pattern"], name)) and len(name) <= items["maxLength"]
    try:
        names.check_package_name(name)
        by_names = True
    except InvalidInput:
        by_names = False
    assert by_crd == by_names


def test_the_defaults_match_resource_py(crd_schema: dict[str, Any]) -> None:
    obj = nix_image(packages=["jq"])
    apply_defaults(obj, crd_schema)
    parsed = resource.parse_resource(nix_image(packages=["jq"]))
    assert {k: obj["spec"][k] for k in ("tag", "format", "compression")} == {
        "tag": parsed.spec.tag,
        "format": parsed.spec.format,
        "compression": parsed.spec.compression,
    }
    # arch has no CRD default (so that "arch or architectures" can be checked), and is
    # amd64 where neither is given.
    assert "arch" not in obj["spec"] and parsed.spec.platform_architectures == ["amd64"]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")))
def test_examples_are_valid_nix_images(crd_schema: dict[str, Any], path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        if not document or document.get("kind") != "NixImage":
            continue
        assert admit(crd_schema, document) == [], path.name
        resource.parse_resource(document)


def test_a_status_the_operator_writes_fits_the_schema(crd_schema: dict[str, Any]) -> None:
    resolved = target()
    digest = "sha256:" + "a" * 64
    result = BuildResult(buildKey=resolved.key, spec={}, ok=True, manifestDigest=digest)
    report = conditions.ready(resolved, result, None, 1, "r:5000")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    status = conditions.desired_status({}, report, 1, resolved.key, now)
    obj = {**nix_image(packages=["jq"]), "status": {**status, "builderPhase": "Succeeded"}}
    assert schema_problems([obj], crd_schema) == []
    obj["status"]["surprise"] = 1
    assert schema_problems([obj], crd_schema) != []  # a real server would prune it


def test_a_cel_rule_says_why(crd_schema: dict[str, Any]) -> None:
    """The CRD's CEL rules (run by cel-python, after defaulting, as the API server runs
    them) say what the builder would say; INVALID above shows both refuse."""
    obj = nix_image(packages=["jq"], format="docker", compression="zstd")
    assert admit(crd_schema, obj) == [
        "spec: Invalid value: format docker has no zstd layers: use format oci, or compression gzip"
    ]
