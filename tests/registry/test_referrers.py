"""SBOMs as OCI referrers, end to end: ``niximage build`` of the offline set writes an image's
CycloneDX document as an artifact whose subject is the image manifest; ``niximage serve``
answers the referrers API and the fallback tag; the oras Python SDK (an independent OCI
client) finds the SBOM and pulls it; cyclonedx-python-lib's validator accepts it; gc keeps
it with its image and deletes it with it. ``niximage sbom`` and ``niximage diff`` read the
same documents from storage.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import oras.provider
import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from niximage_core import layout, referrers
from niximage_core.digest import Digest
from niximage_core.storage.filesystem import FilesystemStorage
from tests.registry.support import RegistryProcess
from testsupport import ROOT, niximage, niximage_json, require

CYCLONEDX = "application/vnd.cyclonedx+json"
TESTPKGS = ROOT / "nix" / "testpkgs"


def versioned_set(folder: Path, jq_version: str) -> Path:
    """The offline set with jq renamed to ``jq-<version>`` (a new store path, as a nixpkgs
    bump of jq gives)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "default.nix").write_text(
        f"args: let base = import {TESTPKGS} args; in base // {{\n"
        f'  jq = (derivation (base.jq.drvAttrs // {{ name = "jq-{jq_version}"; }}))\n'
        f'    // {{ pname = "jq"; version = "{jq_version}"; meta = base.jq.meta; }};\n'
        "}\n"
    )
    return folder


def get_json(url: str) -> tuple[int, dict[str, str], Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require("nix-build")
    root = tmp_path_factory.mktemp("referrers")
    storage = root / "store"
    results = {}
    for version, tag in (("1.6", "app:v1"), ("1.7", "app:v2")):
        source = versioned_set(root / f"jq-{version}", version)
        results[tag] = niximage_json(
            "build", "jq", "--package-source", f"path:{source}", "--storage", str(storage),
            "--tag", tag,
        )  # fmt: skip
    results["other"] = niximage_json(
        "build", "busybox", "--storage", str(storage), "--tag", "other"
    )
    return {"storage": storage, **results}


def test_the_sbom_is_a_valid_cyclonedx_document_of_the_whole_closure(built: dict[str, Any]) -> None:
    result = built["app:v1"]
    text = niximage("sbom", "app:v1", "--storage", str(built["storage"])).stdout
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    doc = json.loads(text)
    closure = {p for layer in result["layers"] for p in layer["paths"] if p != "<top>"}
    components = {c["bom-ref"]: c for c in doc["components"]}
    assert set(components) == closure  # one component per store path, nothing else
    jq = next(c for c in components.values() if c["name"] == "jq")
    assert jq["version"] == "1.6" and jq["type"] == "application"
    assert jq["licenses"] == [{"license": {"id": "MIT"}}]
    assert jq["externalReferences"] == [{"type": "website", "url": "https://jqlang.github.io/jq/"}]
    assert len(jq["hashes"][0]["content"]) == 64  # the NAR's sha256
    # The dependency graph is the store's references: jq → libjq → oniguruma, glibc.
    depends = {d["ref"]: set(d.get("dependsOn", [])) for d in doc["dependencies"]}
    libjq = next(ref for ref in depends[jq["bom-ref"]] if components[ref]["name"] == "libjq")
    assert {components[ref]["name"] for ref in depends[libjq]} >= {"oniguruma", "glibc"}
    assert jq["bom-ref"] in depends["image"]
    assert doc["metadata"]["component"]["hashes"][0]["content"] == result["manifestDigest"][7:]


def test_the_same_closure_gives_the_same_sbom_bytes(built: dict[str, Any], tmp_path: Path) -> None:
    again = niximage_json(
        "build", "busybox", "--storage", str(tmp_path / "elsewhere"), "--tag", "other"
    )
    assert again["referrers"] == built["other"]["referrers"]


def test_a_rebuild_keeps_the_stored_sbom_and_writes_a_vanished_one_again(
    built: dict[str, Any], tmp_path: Path
) -> None:
    storage = tmp_path / "store"
    first = niximage_json("build", "busybox", "--storage", str(storage))
    again = niximage_json("build", "busybox", "--storage", str(storage), "--rebuild")
    assert again["referrers"] == first["referrers"] and again["bytesUploaded"] == 0
    document = Digest.parse(first["referrers"][0]["blobs"][1])
    FilesystemStorage(storage).delete_blob_if_stale(document, time.time() + 60)
    repaired = niximage_json("build", "busybox", "--storage", str(storage), "--rebuild")
    assert repaired["referrers"] == first["referrers"]
    assert FilesystemStorage(storage).blob_size(document) is not None


def test_oras_finds_and_pulls_the_sbom_through_niximage_serve(
    built: dict[str, Any], tmp_path: Path
) -> None:
    subject = built["app:v1"]["manifestDigest"]
    artifact = built["app:v1"]["referrers"][0]["manifestDigest"]
    with RegistryProcess(built["storage"]) as registry:
        host = registry.address
        client = oras.provider.Registry(hostname=host, insecure=True)
        # The referrers API, through the SDK's own session and auth handling.
        url = f"http://{host}/v2/app/referrers/{subject}"
        listed = client.do_request(f"{url}?artifactType={urllib.parse.quote(CYCLONEDX)}", "GET")
        assert listed.status_code == 200
        assert listed.headers["OCI-Filters-Applied"] == "artifactType"
        assert listed.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
        (descriptor,) = listed.json()["manifests"]
        assert descriptor["digest"] == artifact and descriptor["artifactType"] == CYCLONEDX
        # The fallback tag scheme, as the SDK reads any manifest.
        index = client.get_manifest(
            f"{host}/app:sha256-{subject[7:]}",
            allowed_media_type=["application/vnd.oci.image.index.v1+json"],
        )
        assert index["manifests"] == [descriptor]
        manifest = client.get_manifest(f"{host}/app@{artifact}")
        assert manifest["subject"]["digest"] == subject
        assert manifest["artifactType"] == CYCLONEDX
        pulled = client.pull(target=f"{host}/app@{artifact}", outdir=str(tmp_path / "pulled"))
        assert [Path(p).name for p in pulled] == ["sbom.cdx.json"]
        text = Path(pulled[0]).read_text()
        assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
        # Scoped like everything else: another repository neither lists nor serves it.
        status, _, body = get_json(f"http://{host}/v2/other/referrers/{subject}")
        assert status == 200 and body["manifests"] == []
        status, _, _ = get_json(f"http://{host}/v2/other/manifests/{artifact}")
        assert status == 404
        # Other filters: none match.
        status, _, body = get_json(f"{url}?artifactType=application%2Fspdx%2Bjson")
        assert status == 200 and body["manifests"] == []


def test_niximage_diff_names_the_changed_package_and_its_versions(built: dict[str, Any]) -> None:
    storage = str(built["storage"])
    table = niximage("diff", "app:v1", "app:v2", "--storage", storage).stdout
    assert "jq" in table and "1.6" in table and "1.7" in table, table
    doc = json.loads(niximage("diff", "app:v1", "app:v2", "--storage", storage, "--json").stdout)
    (change,) = doc["changed"]
    assert (change["name"], change["oldVersion"], change["newVersion"]) == ("jq", "1.6", "1.7")
    assert doc["added"] == doc["removed"] == []
    assert doc["bytesAdded"] > 0 and doc["layers"]["reused"] >= 3 and doc["layers"]["new"] >= 1
    same = json.loads(niximage("diff", "app:v2", "app:v2", "--storage", storage, "--json").stdout)
    assert same["changed"] == [] and same["layers"]["new"] == 0
    missing = niximage("diff", "app:v1", "app:nope", "--storage", storage, check=False)
    assert missing.returncode == 1 and "no tag app:nope" in missing.stderr


def test_gc_keeps_the_sbom_with_its_image_and_deletes_it_with_it(built: dict[str, Any]) -> None:
    store = FilesystemStorage(built["storage"])
    result = built["app:v1"]
    subject = Digest.parse(result["manifestDigest"])
    sbom = [Digest.parse(d) for d in result["referrers"][0]["blobs"][1:]]
    artifact = Digest.parse(result["referrers"][0]["manifestDigest"])
    # Tagged: kept, even once its build result is gone and everything is past the grace.
    store.delete(layout.build_key_path(result["buildKey"]))
    _age(built["storage"])
    report = json.loads(niximage("gc", "--storage", str(built["storage"]), "--json").stdout)
    assert report["referrers"] == []
    assert all(store.blob_size(d) is not None for d in [artifact, *sbom])
    # Untagged: the image, its SBOM and the link go together.
    store.delete(layout.tag_path("app", "v1"))
    _age(built["storage"])
    report = json.loads(niximage("gc", "--storage", str(built["storage"]), "--json").stdout)
    deleted = {Digest.parse(b["digest"]) for b in report["blobs"]}
    assert {subject, artifact, *sbom} <= deleted
    assert report["referrers"] == [referrers.link_path(subject, artifact)]
    assert referrers.listed(store, subject) == []
    # The other images and their SBOMs are whole.
    assert niximage("sbom", "app:v2", "--storage", str(built["storage"])).returncode == 0


def _age(storage: Path) -> None:
    """Every blob two hours old (past gc's default grace)."""
    old = time.time() - 7200
    for path in (storage / "blobs").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
