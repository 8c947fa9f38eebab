"""The SBOM document (pure): names and versions as Nix splits them, one component per store
path with its NAR hash, the requested packages' meta, the reference graph, and bytes that
depend on nothing but the closure. The whole pipeline is in tests/registry/test_referrers.py."""

from __future__ import annotations

import json

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from niximage_builder import sbom
from niximage_builder.closure import ClosureGraph, StorePath
from niximage_core import closurediff, imagespec
from niximage_core.digest import Digest
from niximage_core.sources import PathSource

SOURCE = PathSource(path="/pkgs", narHash="sha256-" + "A" * 43 + "=")
NAR = "sha256-czlXJ5fuADrRJMt570qmPvq2EsaLbLaKNYdeFRwy+R4="
SUBJECT = Digest("ab" * 32)


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("jq-1.6", ("jq", "1.6")),
        ("glibc", ("glibc", "")),
        ("python3.11-six-1.16.0", ("python3.11-six", "1.16.0")),
        ("python3.11-pyhello", ("python3.11-pyhello", "")),
        ("openssl-3.0.11-bin", ("openssl", "3.0.11-bin")),
        ("hello-", ("hello-", "")),
        ("gcc-libs-12-x", ("gcc-libs", "12-x")),
    ],
)
def test_names_split_as_nix_parse_drv_name_does(name: str, split: tuple[str, str]) -> None:
    assert sbom.split_name(name) == split


def graph() -> ClosureGraph:
    nodes = {
        "/nix/store/" + "a" * 32 + "-jq-1.6": ("/nix/store/" + "b" * 32 + "-glibc",),
        "/nix/store/" + "b" * 32 + "-glibc": (),
    }
    return ClosureGraph(
        ("/nix/store/" + "a" * 32 + "-jq-1.6",),
        {path: StorePath(path, refs, 1000 + len(refs), NAR) for path, refs in nodes.items()},
    )


def test_the_document_is_valid_canonical_and_reproducible() -> None:
    spec = imagespec.make_spec(["jq"], SOURCE)
    meta = [
        {
            "path": graph().roots[0],
            "licenses": ["MIT", "a licence of its own"],
            "homepage": "https://jq.example",
            "description": "JSON",
            "version": "1.6",
        }
    ]
    first = sbom.document(spec, graph(), meta, SUBJECT)
    assert first == sbom.document(spec, graph(), meta, SUBJECT)
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(first.decode()) is None
    doc = json.loads(first)
    assert first == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["metadata"]["timestamp"].startswith("1970-01-01")
    jq, glibc = sorted(doc["components"], key=lambda c: c["name"], reverse=True)
    assert jq["licenses"] == [
        {"license": {"id": "MIT"}},
        {"license": {"name": "a licence of its own"}},
    ]
    nar_hex = "7339572797ee003ad124cb79ef4aa63efab612c68b6cb68a35875e151c32f91e"
    assert glibc["hashes"] == [{"alg": "SHA-256", "content": nar_hex}]
    assert "licenses" not in glibc and glibc["type"] == "library" and jq["type"] == "application"
    # What closurediff reads back.
    found = closurediff.packages(doc)
    assert {(p.name, p.version, p.nar_size) for p in found.values()} == {
        ("jq", "1.6", 1001),
        ("glibc", "", 1000),
    }
    # Another image (subject) gets another serial number; nothing else differs.
    other = json.loads(sbom.document(spec, graph(), meta, Digest("cd" * 32)))
    assert other["serialNumber"] != doc["serialNumber"]


def test_meta_that_is_not_what_nix_gives_is_left_out() -> None:
    spec = imagespec.make_spec(["jq"], SOURCE)
    meta = [{"path": graph().roots[0], "licenses": [None, 3, ""], "homepage": "javascript:x",
             "description": ["not", "a string"], "version": 7}]  # fmt: skip
    doc = json.loads(sbom.document(spec, graph(), meta, SUBJECT))
    jq = next(c for c in doc["components"] if c["name"] == "jq")
    assert "licenses" not in jq and "externalReferences" not in jq and "description" not in jq
    assert jq["version"] == "1.6"  # from the store path's name
