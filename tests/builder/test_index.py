"""Several platforms: the index spec, its key, the index manifest, the resource's field."""

from __future__ import annotations

import json

import pytest

from niximage_core import imagespec, manifest, resource, sources
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput
from niximage_core.gc import result_digests
from niximage_core.gc.marking import manifest_references
from niximage_core.result import BuildResult, PlatformResult

SRC = sources.parse_source("nixpkgs:" + "a" * 40)


def target(*architectures: str, **choices: str) -> imagespec.BuildTarget:
    return imagespec.make_target(["jq"], SRC, architectures=architectures, **choices)


def test_one_architecture_is_one_image_as_before() -> None:
    assert target("arm64") == imagespec.make_spec(["jq"], SRC, arch="arm64")


def test_an_index_is_keyed_by_its_platforms_builds() -> None:
    both = target("amd64", "arm64")
    assert isinstance(both, imagespec.IndexSpec)
    assert both.architectures == ("amd64", "arm64")
    alone = {arch: target(arch).build_key() for arch in ("amd64", "arm64")}
    # Each platform is the very build it would be alone: adding arm64 reuses amd64's.
    assert [image.build_key() for image in both.images] == [alone["amd64"], alone["arm64"]]
    assert both.build_key() not in alone.values()
    # The order asked is the index's order, and part of its identity.
    assert target("arm64", "amd64").build_key() != both.build_key()
    assert target("amd64", "arm64", format="docker").build_key() != both.build_key()


@pytest.mark.parametrize(
    ("architectures", "message"),
    [
        ((), "give one architecture or more"),
        (("amd64", "amd64"), "must not repeat"),
        (("amd64", "riscv64"), "Input should be 'amd64' or 'arm64'"),
    ],
)
def test_bad_platform_sets_are_refused(architectures: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        target(*architectures)


def test_the_spec_document_names_the_architectures() -> None:
    document = imagespec.spec_document(target("amd64", "arm64"))
    assert document["architectures"] == ["amd64", "arm64"] and "arch" not in document
    assert document["packages"] == ["cacert", "iana-etc", "jq"]


def entry(arch: str, fill: str) -> manifest.IndexEntry:
    return manifest.IndexEntry(arch, manifest.OCI_MANIFEST, Digest.of(fill.encode()), 1000)


def test_the_index_manifest_names_each_platform() -> None:
    index = manifest.image_index("oci", [entry("amd64", "a"), entry("arm64", "b")])
    document = json.loads(index.data)
    assert index.media_type == document["mediaType"] == manifest.OCI_INDEX
    assert [m["platform"] for m in document["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    assert manifest.media_type_of(index.data) == manifest.OCI_INDEX
    # gc and the registry's repository scoping walk from the index to its images.
    assert manifest_references(index.data).manifests == (
        Digest.of(b"a"),
        Digest.of(b"b"),
    )
    docker = manifest.image_index("docker", [entry("amd64", "a"), entry("arm64", "b")])
    assert json.loads(docker.data)["mediaType"] == manifest.DOCKER_LIST


def test_an_index_result_names_every_blob_of_every_platform() -> None:
    digests = [str(Digest.of(bytes([n]))) for n in range(7)]
    result = BuildResult(
        buildKey="k",
        spec={},
        ok=True,
        manifestDigest=digests[0],
        platforms=[
            PlatformResult(
                architecture="amd64", buildKey="a", manifestDigest=digests[1],
                configDigest=digests[2], imageSize=1, layers=[digests[3]],
            ),
            PlatformResult(
                architecture="arm64", buildKey="b", manifestDigest=digests[4],
                configDigest=digests[5], imageSize=1, layers=[digests[6], digests[3]],
            ),
        ],
    )  # fmt: skip
    assert [str(d) for d in result_digests(result)] == [*digests, digests[3]]
    message = json.loads(result.termination_message())
    assert message["platforms"] == {"amd64": digests[1], "arm64": digests[4]}


def nix_image(spec: dict[str, object]) -> resource.NixImage:
    return resource.parse_resource(
        {
            "apiVersion": resource.API_VERSION,
            "kind": resource.KIND,
            "metadata": {"name": "jq"},
            "spec": {"packages": ["jq"], **spec},
        }
    )


def test_a_nix_image_asks_for_several_architectures() -> None:
    image = nix_image({"architectures": ["amd64", "arm64"]})
    assert image.spec.platform_architectures == ["amd64", "arm64"]
    built = image.target("nixpkgs:" + "a" * 40)
    assert isinstance(built, imagespec.IndexSpec)
    assert nix_image({"arch": "arm64"}).spec.platform_architectures == ["arm64"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"architectures": []}, "architectures: List should have at least 1 item"),
        ({"architectures": ["amd64", "s390x"]}, "architectures.1: Input should be"),
        ({"architectures": ["arm64", "arm64"]}, "architectures must not repeat"),
        ({"arch": "arm64", "architectures": ["arm64"]}, "give arch or architectures, not both"),
    ],
)
def test_bad_architectures_are_refused_by_the_resource(
    spec: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        nix_image(spec)
