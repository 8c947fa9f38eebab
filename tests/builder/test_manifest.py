"""Configs, manifests, references, results and NixImage files: pure and canonical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from niximage_core import manifest, reference, resource, sources
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, PackagesNotFound
from niximage_core.imagespec import make_spec
from niximage_core.result import TERMINATION_LIMIT, BuildError, BuildResult

SRC = sources.parse_source("nixpkgs:" + "a" * 40)
LAYERS = [
    manifest.LayerDescriptor(Digest.of(b"l1"), Digest.of(b"t1"), 10, "1 store paths"),
    manifest.LayerDescriptor(Digest.of(b"l2"), Digest.of(b"t2"), 20, "symlink forest"),
]


def _image(fmt: str = "oci", compression: str = "gzip") -> tuple[manifest.Blob, manifest.Blob]:
    spec = make_spec(["bash", "jq"], SRC, format=fmt, compression=compression)
    config = manifest.image_config(spec, LAYERS, ["bash"])
    return config, manifest.image_manifest(spec, config, LAYERS)


def test_oci_manifest_and_config() -> None:
    config, image = _image()
    doc = json.loads(image.data)
    assert doc["mediaType"] == manifest.OCI_MANIFEST and doc["schemaVersion"] == 2
    assert doc["config"] == {
        "mediaType": manifest.OCI_CONFIG,
        "digest": str(config.digest),
        "size": len(config.data),
    }
    assert [layer["digest"] for layer in doc["layers"]] == [str(x.digest) for x in LAYERS]
    assert {layer["mediaType"] for layer in doc["layers"]} == {LAYER_GZIP}
    cfg = json.loads(config.data)
    assert cfg["architecture"] == "amd64" and cfg["os"] == "linux"
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [str(x.diff_id) for x in LAYERS]}
    assert cfg["config"]["Cmd"] == ["bash"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt" in cfg["config"]["Env"]
    assert any(e.startswith("PATH=/bin") for e in cfg["config"]["Env"])
    assert cfg["config"]["Labels"][manifest.LABEL_PACKAGES] == "bash cacert iana-etc jq"
    assert cfg["created"] == manifest.CREATED
    assert len(cfg["history"]) == len(LAYERS)
    assert manifest.media_type_of(image.data) == manifest.OCI_MANIFEST


LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def test_bytes_are_canonical_and_reproducible() -> None:
    first, second = _image(), _image()
    assert first[1].data == second[1].data
    assert b" " not in first[1].data and b"\n" not in first[1].data
    assert (
        json.dumps(json.loads(first[1].data), sort_keys=True, separators=(",", ":")).encode()
        == first[1].data
    )


def test_docker_format() -> None:
    _config, image = _image("docker")
    doc = json.loads(image.data)
    assert doc["mediaType"] == manifest.DOCKER_MANIFEST
    assert doc["config"]["mediaType"] == manifest.DOCKER_CONFIG
    assert doc["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"


def test_zstd_needs_oci() -> None:
    _config, image = _image("oci", "zstd")
    assert json.loads(image.data)["layers"][0]["mediaType"].endswith("tar+zstd")
    with pytest.raises(InvalidInput, match="oci"):
        _image("docker", "zstd")


def test_media_type_of_rejects_non_manifests() -> None:
    assert manifest.media_type_of(b"not json") is None
    assert manifest.media_type_of(b'{"mediaType": "text/html"}') is None
    assert manifest.media_type_of(b"[1]") is None


@pytest.mark.parametrize(
    ("text", "repository", "tag", "digest"),
    [
        ("jq", "jq", "latest", None),
        ("default/jq:1.0", "default/jq", "1.0", None),
        ("a/b@sha256:" + "0" * 64, "a/b", None, "sha256:" + "0" * 64),
    ],
)
def test_image_refs(text: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = reference.ImageRef.parse(text)
    assert (ref.repository, ref.tag, str(ref.digest) if ref.digest else None) == (
        repository,
        tag,
        digest,
    )
    assert str(ref) == (text if ":" in text else f"{text}:latest")


@pytest.mark.parametrize(
    "text",
    [
        "../etc:passwd",
        "UPPER:x",
        "a//b:x",
        "a:" + "t" * 200,
        "a@sha256:xyz",
        "a:.bad",
        "/abs:x",
        "a b:c",
    ],
)
def test_bad_refs(text: str) -> None:
    with pytest.raises(InvalidInput):
        reference.ImageRef.parse(text)


def test_termination_message_fits_and_names_missing_packages() -> None:
    names = [f"package-number-{i}" for i in range(1000)]
    result = BuildResult(
        buildKey="k" * 64,
        spec={},
        ok=False,
        error=BuildError.from_exception(PackagesNotFound(names)),
    )
    text = result.termination_message()
    assert len(text.encode()) <= TERMINATION_LIMIT
    summary = json.loads(text)
    assert (
        summary["kind"] == "MissingPackages" and summary["missingPackages"][:2] == sorted(names)[:2]
    )
    assert BuildResult.from_json(result.to_json()) == result


def test_nix_image_file(tmp_path: Path) -> None:
    path = tmp_path / "image.yaml"
    path.write_text(
        "apiVersion: niximage.dev/v1alpha1\nkind: NixImage\n"
        "metadata: {name: tools, namespace: dev}\n"
        "spec: {packages: [jq, bash], arch: arm64, tag: v1,\n"
        "       packageSource: {type: nixpkgs, channel: nixos-24.05}}\n"
    )
    image = resource.load_file(str(path))
    assert image.repository == "dev/tools" and image.spec.tag == "v1"
    spec = image.image_spec("path:/unused")
    assert spec.arch == "arm64" and spec.packages == ("bash", "cacert", "iana-etc", "jq")
    assert str(spec.source) == "nixpkgs:nixos-24.05"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("spec: {packages: []}", "packages"),
        ("spec: {packages: [jq, jq]}", "must not repeat"),
        ("spec: {packages: ['a b']}", "a b"),
        ("spec: {packages: [jq], arch: riscv}", "arch"),
        ("spec: {packages: [jq], tag: 'bad tag'}", "tag"),
        ("spec: {packages: [jq], extra: 1}", "extra"),
        ("spec: {packages: [jq], packageSource: 'nixpkgs:x'}", "packageSource is an object"),
    ],
)
def test_bad_nix_image_files(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "image.yaml"
    path.write_text(
        f"apiVersion: niximage.dev/v1alpha1\nkind: NixImage\nmetadata: {{name: x}}\n{body}\n"
    )
    with pytest.raises(InvalidInput, match=message):
        resource.load_file(str(path))


def test_example_nix_images_are_valid() -> None:
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    nix_images = [path for path in examples if "kind: NixImage" in path.read_text()]
    assert len(nix_images) >= 2
    for path in nix_images:
        assert resource.load_file(str(path)).spec.packages
