"""One table of HTTP cases (go-containerregistry's style) through aiohttp's TestClient.

Each case: method, path, request headers → status, required response headers, and a check
of the body. Paths and expectations may name the synthetic image's digests as ``{oci}``,
``{docker}``, ``{config}``, ``{layer}``, ``{index}``, ``{big}``; ``{size:layer}`` etc. are
their sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from niximage_core import layout, manifest
from tests.registry.support import Image

pytestmark = pytest.mark.asyncio

ZERO = "sha256:" + "0" * 64
OCI = manifest.OCI_MANIFEST


@dataclass(frozen=True)
class Case:
    what: str
    method: str
    path: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    expect: dict[str, str] = field(default_factory=dict)
    """Response headers that must be present with these values ("*": present at all)."""
    absent: tuple[str, ...] = ()
    code: str | None = None
    """The error code of the JSON envelope; the body must be one."""
    body: str | None = None
    """The exact body (a placeholder name, or text)."""


CASES = [
    # /v2/
    Case("ping", "GET", "/v2/", 200, expect={"Docker-Distribution-Api-Version": "registry/2.0"}),
    Case("ping without slash", "GET", "/v2", 200),
    Case("ping HEAD", "HEAD", "/v2/", 200),
    Case("ping POST", "POST", "/v2/", 405, code="UNSUPPORTED"),
    # manifests by tag
    Case(
        "manifest by tag",
        "GET",
        "/v2/test/app/manifests/latest",
        200,
        expect={
            "Content-Type": OCI,
            "Docker-Content-Digest": "{oci}",
            "Content-Length": "{size:oci}",
            "ETag": '"{oci}"',
        },
        body="oci",
    ),
    Case(
        "manifest HEAD has the true length and no body",
        "HEAD",
        "/v2/test/app/manifests/latest",
        200,
        expect={
            "Content-Type": OCI,
            "Docker-Content-Digest": "{oci}",
            "Content-Length": "{size:oci}",
        },
        body="",
    ),
    Case(
        "docker manifest keeps its own type",
        "GET",
        "/v2/test/app/manifests/docker",
        200,
        expect={"Content-Type": manifest.DOCKER_MANIFEST, "Docker-Content-Digest": "{docker}"},
        body="docker",
    ),
    Case(
        "Accept never converts: docker type asked, OCI served",
        "GET",
        "/v2/test/app/manifests/latest",
        200,
        headers={"Accept": manifest.DOCKER_MANIFEST},
        expect={"Content-Type": OCI},
        body="oci",
    ),
    Case(
        "Accept never converts: OCI only asked, docker served",
        "GET",
        "/v2/test/app/manifests/docker",
        200,
        headers={"Accept": f"{manifest.OCI_INDEX}, {OCI}"},
        expect={"Content-Type": manifest.DOCKER_MANIFEST},
    ),
    Case(
        "index by tag",
        "GET",
        "/v2/test/app/manifests/index",
        200,
        expect={"Content-Type": manifest.OCI_INDEX, "Docker-Content-Digest": "{index}"},
        body="index",
    ),
    Case("containerd's ?ns= is ignored", "GET", "/v2/test/app/manifests/latest?ns=docker.io", 200),
    Case(
        "If-None-Match with the digest",
        "GET",
        "/v2/test/app/manifests/latest",
        304,
        headers={"If-None-Match": '"{oci}"'},
    ),
    Case("unknown tag", "GET", "/v2/test/app/manifests/nope", 404, code="MANIFEST_UNKNOWN"),
    Case("unknown tag HEAD", "HEAD", "/v2/test/app/manifests/nope", 404, body=""),
    Case("unknown repository", "GET", "/v2/nope/manifests/latest", 404, code="NAME_UNKNOWN"),
    Case("nested repository", "GET", "/v2/a/b/manifests/latest", 200, body="oci"),
    Case("parent is its own repository", "GET", "/v2/a/manifests/latest", 404),
    Case("parent's own tag", "GET", "/v2/a/manifests/solo", 200),
    # manifests by digest
    Case(
        "manifest by digest",
        "GET",
        "/v2/test/app/manifests/{oci}",
        200,
        expect={"Docker-Content-Digest": "{oci}", "Content-Type": OCI},
        body="oci",
    ),
    Case("child of an index by digest", "HEAD", "/v2/test/app/manifests/{oci}", 200),
    Case(
        "a manifest other/repo never had",
        "GET",
        "/v2/other/repo/manifests/{index}",
        404,
        code="MANIFEST_UNKNOWN",
    ),
    Case("a manifest other/repo has", "GET", "/v2/other/repo/manifests/{oci}", 200),
    Case("a blob of test/app's old revision", "HEAD", "/v2/test/app/blobs/{big}", 200),
    Case(
        "a blob other/repo never had",
        "GET",
        "/v2/other/repo/blobs/{big}",
        404,
        code="BLOB_UNKNOWN",
    ),
    Case(
        "a blob other/repo never had, HEAD",
        "HEAD",
        "/v2/other/repo/blobs/{big}",
        404,
    ),
    Case(
        "digest under unknown repository",
        "GET",
        "/v2/nope/manifests/{oci}",
        404,
        code="NAME_UNKNOWN",
    ),
    Case("unknown digest", "GET", "/v2/test/app/manifests/" + ZERO, 404, code="MANIFEST_UNKNOWN"),
    Case(
        "a config is no manifest",
        "GET",
        "/v2/test/app/manifests/{config}",
        404,
        code="MANIFEST_UNKNOWN",
    ),
    Case("a layer is no manifest", "GET", "/v2/test/app/manifests/{layer}", 404),
    Case("a 5 MiB blob is not read as a manifest", "GET", "/v2/test/app/manifests/{big}", 404),
    Case(
        "malformed digest is 400",
        "GET",
        "/v2/test/app/manifests/sha256:baddigeststring",
        400,
        code="DIGEST_INVALID",
    ),
    Case("upper-case digest", "GET", "/v2/test/app/manifests/sha256:" + "A" * 64, 400),
    Case(
        "sha512 is well-formed but unknown",
        "GET",
        "/v2/test/app/manifests/sha512:" + "a" * 128,
        404,
    ),
    Case("invalid tag", "GET", "/v2/test/app/manifests/-bad", 400, code="TAG_INVALID"),
    Case("tag too long", "GET", "/v2/test/app/manifests/" + "t" * 129, 400),
    # blobs
    Case(
        "blob",
        "GET",
        "/v2/test/app/blobs/{layer}",
        200,
        expect={
            "Content-Length": "{size:layer}",
            "Docker-Content-Digest": "{layer}",
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        },
        absent=("Content-Encoding",),
        body="layer",
    ),
    Case(
        "blob HEAD",
        "HEAD",
        "/v2/test/app/blobs/{layer}",
        200,
        expect={"Content-Length": "{size:layer}", "Docker-Content-Digest": "{layer}"},
        body="",
    ),
    Case("config blob", "GET", "/v2/test/app/blobs/{config}", 200, body="config"),
    Case("manifest as a blob", "GET", "/v2/test/app/blobs/{oci}", 200, body="oci"),
    Case(
        "gzip asked, not applied",
        "GET",
        "/v2/test/app/blobs/{layer}",
        200,
        headers={"Accept-Encoding": "gzip"},
        absent=("Content-Encoding",),
        body="layer",
    ),
    Case("unknown blob", "GET", "/v2/test/app/blobs/" + ZERO, 404, code="BLOB_UNKNOWN"),
    Case("unknown blob HEAD", "HEAD", "/v2/test/app/blobs/" + ZERO, 404, body=""),
    Case(
        "blob under unknown repository", "GET", "/v2/nope/blobs/{layer}", 404, code="NAME_UNKNOWN"
    ),
    Case(
        "malformed blob digest", "GET", "/v2/test/app/blobs/sha256:zzz", 400, code="DIGEST_INVALID"
    ),
    Case("blob digest without algorithm", "GET", "/v2/test/app/blobs/" + "0" * 64, 400),
    # ranges
    Case(
        "range",
        "GET",
        "/v2/test/app/blobs/{layer}",
        206,
        headers={"Range": "bytes=0-9"},
        expect={"Content-Range": "bytes 0-9/{size:layer}", "Content-Length": "10"},
        body="layer[0:10]",
    ),
    Case(
        "open range",
        "GET",
        "/v2/test/app/blobs/{layer}",
        206,
        headers={"Range": "bytes=10-"},
        expect={"Content-Range": "bytes 10-{last:layer}/{size:layer}"},
        body="layer[10:]",
    ),
    Case(
        "suffix range",
        "GET",
        "/v2/test/app/blobs/{layer}",
        206,
        headers={"Range": "bytes=-5"},
        body="layer[-5:]",
    ),
    Case(
        "suffix longer than the blob",
        "GET",
        "/v2/test/app/blobs/{layer}",
        206,
        headers={"Range": "bytes=-999999"},
        body="layer",
    ),
    Case(
        "end past the size is clamped",
        "GET",
        "/v2/test/app/blobs/{layer}",
        206,
        headers={"Range": "bytes=5-999999"},
        body="layer[5:]",
    ),
    Case(
        "start past the end",
        "GET",
        "/v2/test/app/blobs/{layer}",
        416,
        headers={"Range": "bytes=999999-"},
        expect={"Content-Range": "bytes */{size:layer}"},
        code="RANGE_INVALID",
    ),
    Case(
        "last before first",
        "GET",
        "/v2/test/app/blobs/{layer}",
        416,
        headers={"Range": "bytes=9-0"},
    ),
    Case("garbage range", "GET", "/v2/test/app/blobs/{layer}", 416, headers={"Range": "bytes=a-b"}),
    Case("empty suffix", "GET", "/v2/test/app/blobs/{layer}", 416, headers={"Range": "bytes=-0"}),
    Case(
        "other unit is ignored",
        "GET",
        "/v2/test/app/blobs/{layer}",
        200,
        headers={"Range": "items=0-1"},
        body="layer",
    ),
    Case(
        "multiple ranges: whole blob",
        "GET",
        "/v2/test/app/blobs/{layer}",
        200,
        headers={"Range": "bytes=0-1,5-6"},
        body="layer",
    ),
    # tags
    Case(
        "tags list",
        "GET",
        "/v2/test/app/tags/list",
        200,
        absent=("Link",),
        body='{"name": "test/app", "tags": ["docker", "index", "latest"]}',
    ),
    Case(
        "repository named like the route",
        "GET",
        "/v2/many/tags/tags/list",
        200,
        body='{"name": "many/tags", "tags": ["v1", "v2", "v3", "v4", "v5"]}',
    ),
    Case(
        "first page",
        "GET",
        "/v2/many/tags/tags/list?n=2",
        200,
        expect={"Link": '</v2/many/tags/tags/list?n=2&last=v2>; rel="next"'},
        body='{"name": "many/tags", "tags": ["v1", "v2"]}',
    ),
    Case(
        "next page",
        "GET",
        "/v2/many/tags/tags/list?n=2&last=v2",
        200,
        expect={"Link": '</v2/many/tags/tags/list?n=2&last=v4>; rel="next"'},
        body='{"name": "many/tags", "tags": ["v3", "v4"]}',
    ),
    Case(
        "last page has no Link",
        "GET",
        "/v2/many/tags/tags/list?n=2&last=v4",
        200,
        absent=("Link",),
        body='{"name": "many/tags", "tags": ["v5"]}',
    ),
    Case(
        "last without n",
        "GET",
        "/v2/many/tags/tags/list?last=v3",
        200,
        body='{"name": "many/tags", "tags": ["v4", "v5"]}',
    ),
    Case(
        "n=0",
        "GET",
        "/v2/many/tags/tags/list?n=0",
        200,
        absent=("Link",),
        body='{"name": "many/tags", "tags": []}',
    ),
    Case("n too big for the list", "GET", "/v2/many/tags/tags/list?n=50", 200, absent=("Link",)),
    Case("bad n", "GET", "/v2/many/tags/tags/list?n=-1", 400, code="PAGINATION_NUMBER_INVALID"),
    Case("non-numeric n", "GET", "/v2/many/tags/tags/list?n=abc", 400),
    Case(
        "parent's tags only", "GET", "/v2/a/tags/list", 200, body='{"name": "a", "tags": ["solo"]}'
    ),
    Case("tags of unknown repository", "GET", "/v2/nope/tags/list", 404, code="NAME_UNKNOWN"),
    # push and delete
    Case(
        "manifest PUT",
        "PUT",
        "/v2/test/app/manifests/latest",
        405,
        code="UNSUPPORTED",
        expect={"Allow": "GET, HEAD"},
    ),
    Case("manifest DELETE", "DELETE", "/v2/test/app/manifests/{oci}", 405, code="UNSUPPORTED"),
    Case("blob DELETE", "DELETE", "/v2/test/app/blobs/{layer}", 405, code="UNSUPPORTED"),
    Case("upload start", "POST", "/v2/test/app/blobs/uploads/", 405, code="UNSUPPORTED"),
    Case("upload mount", "POST", "/v2/test/app/blobs/uploads/?mount={layer}&from=other/repo", 405),
    Case("upload chunk", "PATCH", "/v2/test/app/blobs/uploads/some-uuid", 405),
    Case("upload status", "GET", "/v2/test/app/blobs/uploads/some-uuid", 405),
    Case("tags DELETE", "DELETE", "/v2/test/app/tags/list", 405),
    Case(
        "method the parser refuses",
        "FROB",
        "/v2/test/app/manifests/latest",
        405,
        code="UNSUPPORTED",
        expect={"Allow": "GET, HEAD"},
    ),
    Case("OPTIONS", "OPTIONS", "/v2/test/app/manifests/latest", 405),
    # other routes
    # referrers (OCI 1.1): never a 404; scoped like manifests; tests/registry/test_referrers.py
    # has an image with an SBOM
    Case(
        "referrers of an image with none: an empty index",
        "GET",
        "/v2/test/app/referrers/{oci}",
        200,
        expect={"Content-Type": "application/vnd.oci.image.index.v1+json"},
        absent=("OCI-Filters-Applied",),
        body='{"manifests":[],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}',
    ),
    Case(
        "referrers filtered by artifactType say so",
        "GET",
        "/v2/test/app/referrers/{oci}?artifactType=application/vnd.cyclonedx%2Bjson",
        200,
        expect={"OCI-Filters-Applied": "artifactType"},
        body='{"manifests":[],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}',
    ),
    Case(
        "referrers of an unknown repository: empty, revealing nothing",
        "GET",
        "/v2/nobody/here/referrers/{oci}",
        200,
        body='{"manifests":[],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}',
    ),
    Case("referrers of a sha512: none", "GET", "/v2/test/app/referrers/sha512:" + "a" * 128, 200),
    Case(
        "referrers of a malformed digest",
        "GET",
        "/v2/test/app/referrers/sha256:zz",
        400,
        code="DIGEST_INVALID",
    ),
    Case(
        "referrers with a malformed artifactType",
        "GET",
        "/v2/test/app/referrers/{oci}?artifactType=%3Cscript%3E",
        400,
        code="REQUEST_INVALID",
    ),
    Case(
        "the referrers fallback tag of an image without referrers",
        "GET",
        "/v2/test/app/manifests/sha256-" + "b" * 64,
        404,
        code="MANIFEST_UNKNOWN",
    ),
    Case("catalog is not implemented", "GET", "/v2/_catalog", 404),
    Case("unknown route", "GET", "/nope", 404, code="UNSUPPORTED"),
    Case("unknown route under /v2", "GET", "/v2/test/app/nope", 404, code="UNSUPPORTED"),
    Case("healthz", "GET", "/healthz", 200, body='{"status": "ok"}'),
    Case("healthz POST", "POST", "/healthz", 405),
    Case("metrics", "GET", "/metrics", 200),
    # hostile input: always a JSON 4xx, never a 500, never a file outside storage
    Case("dot-dot in name", "GET", "/v2/a/../../../etc/manifests/latest", 404),
    Case(
        "encoded dot-dot in name",
        "GET",
        "/v2/..%2f..%2fetc/manifests/latest",
        400,
        code="NAME_INVALID",
    ),
    Case("encoded slash in tag", "GET", "/v2/test/app/manifests/..%2f..%2flatest", 404),
    Case("dot-dot digest", "GET", "/v2/test/app/blobs/sha256:../../etc/passwd", 404),
    Case("encoded dot-dot digest", "GET", "/v2/test/app/blobs/sha256:..%2f..%2fetc%2fpasswd", 404),
    Case("absolute path digest", "GET", "/v2/test/app/blobs/%2fetc%2fpasswd", 404),
    Case("upper-case name", "GET", "/v2/Test/App/manifests/latest", 400, code="NAME_INVALID"),
    Case(
        "over-long name", "GET", "/v2/" + "a" * 300 + "/manifests/latest", 400, code="NAME_INVALID"
    ),
    Case("over-long path", "GET", "/v2/" + "a/" * 1500 + "manifests/latest", 400),
    Case("empty name component", "GET", "/v2/test//app/manifests/latest", 400),
    Case("NUL in name", "GET", "/v2/test%00/manifests/latest", 400),
    Case("space in tag", "GET", "/v2/test/app/manifests/lat%20est", 400),
    Case("tags dir as tag", "GET", "/v2/a/manifests/b", 404, code="MANIFEST_UNKNOWN"),
    Case("storage key as name", "GET", "/v2/tags/manifests/latest", 404),
]


def _expand(text: str, image: Image) -> str:
    digests = {
        "oci": image.manifest.digest,
        "docker": image.docker_manifest.digest,
        "config": image.config.digest,
        "layer": image.layer_digest,
        "index": image.index_digest,
        "big": image.big,
    }
    sizes = {
        "oci": len(image.manifest.data),
        "layer": len(image.layer),
    }
    for name, digest in digests.items():
        text = text.replace("{" + name + "}", str(digest))
    for name, size in sizes.items():
        text = text.replace("{size:" + name + "}", str(size))
        text = text.replace("{last:" + name + "}", str(size - 1))
    return text


def _expected_body(spec: str, image: Image) -> bytes:
    contents = {
        "oci": image.manifest.data,
        "docker": image.docker_manifest.data,
        "config": image.config.data,
        "index": image.index,
        "layer": image.layer,
    }
    name, _, sliced = spec.partition("[")
    if name in contents:
        data = contents[name]
        if sliced:
            start, _, end = sliced.rstrip("]").partition(":")
            return data[int(start) if start else None : int(end) if end else None]
        return data
    return spec.encode()


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
async def test_case(case: Case, client: TestClient, image: Image) -> None:
    headers = {k: _expand(v, image) for k, v in case.headers.items()}
    response = await client.request(case.method, _expand(case.path, image), headers=headers)
    body = await response.read()
    assert response.status == case.status, body[:500]
    for name, value in case.expect.items():
        assert name in response.headers, f"missing {name}"
        if value != "*":
            assert response.headers[name] == _expand(value, image), name
    for name in case.absent:
        assert name not in response.headers, name
    if case.status >= 400:
        assert response.status < 500
        assert response.headers["Content-Type"] == "application/json"
        if case.method != "HEAD":
            error = json.loads(body)["errors"][0]
            assert set(error) <= {"code", "message", "detail"} and error["message"]
            if case.code:
                assert error["code"] == case.code
    if case.body is not None:
        assert body == _expected_body(case.body, image)
    if case.method == "HEAD":
        assert body == b""


async def test_unknown_routes_and_errors_never_read_outside_storage(
    client: TestClient, image: Image, tmp_path: Any
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("do not serve")
    for path in (
        "/v2/test/app/blobs/sha256:../../secret",
        "/v2/test/app/manifests/..%2F..%2F..%2Fsecret",
        "/v2/..%2F..%2Fsecret/tags/list",
        "/v2/test/app/blobs/..%2F..%2F..%2Fsecret",
    ):
        response = await client.get(path)
        assert 400 <= response.status < 500
        assert b"do not serve" not in await response.read()


async def test_huge_header_is_a_json_4xx(client: TestClient, image: Image) -> None:
    response = await client.get("/v2/test/app/manifests/latest", headers={"X-Big": "x" * 20000})
    assert response.status == 431
    assert json.loads(await response.read())["errors"][0]["code"] == "HEADERS_TOO_LARGE"


async def test_repeated_accept_headers_are_fine(client: TestClient, image: Image) -> None:
    headers = [("Accept", manifest.OCI_MANIFEST), ("Accept", manifest.DOCKER_MANIFEST)]
    response = await client.get("/v2/test/app/manifests/docker", headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"] == manifest.DOCKER_MANIFEST


async def test_moved_tag_is_seen_after_the_cache_ttl(
    make_client: Any, store: Any, image: Image
) -> None:
    from niximage_registry.app import AppSettings
    from niximage_registry.content import CacheSettings

    client = await make_client(AppSettings(cache=CacheSettings(tag_ttl=0)))
    first = await client.get("/v2/test/app/manifests/latest")
    assert first.headers["Docker-Content-Digest"] == str(image.manifest.digest)
    store.write(layout.tag_path("test/app", "latest"), str(image.docker_manifest.digest).encode())
    second = await client.get("/v2/test/app/manifests/latest")
    assert second.headers["Docker-Content-Digest"] == str(image.docker_manifest.digest)


async def test_corrupt_manifest_is_never_served(
    client: TestClient, store: Any, image: Image
) -> None:
    path = store.root / "blobs" / "sha256" / image.docker_manifest.digest.hex
    path.write_bytes(path.read_bytes().replace(b"schemaVersion", b"schemaVersioN"))
    response = await client.get("/v2/test/app/manifests/docker")
    assert response.status == 503
    assert json.loads(await response.read())["errors"][0]["code"] == "UNAVAILABLE"


async def test_tag_pointing_at_a_missing_manifest(client: TestClient, store: Any) -> None:
    store.write(layout.tag_path("test/app", "dangling"), ("sha256:" + "1" * 64).encode())
    response = await client.get("/v2/test/app/manifests/dangling")
    assert response.status == 404


async def test_metrics_count_requests_bytes_and_cache(client: TestClient, image: Image) -> None:
    for _ in range(3):
        await client.get("/v2/test/app/manifests/latest")
    await client.get(f"/v2/test/app/blobs/{image.layer_digest}")
    await client.get("/v2/test/app/manifests/nope")
    text = await (await client.get("/metrics")).text()
    labels = 'method="GET",route="manifest",status="200",worker="0"'
    assert f"niximage_registry_requests_total{{{labels}}} 3.0" in text
    assert 'route="manifest",status="404"' in text
    assert (
        f'niximage_registry_bytes_served_total{{route="blob",worker="0"}} {float(len(image.layer))}'
        in text
    )
    assert 'niximage_registry_cache_lookups_total{cache="tag",result="hit",worker="0"} 2.0' in text
    assert "niximage_registry_request_duration_seconds_bucket" in text


async def test_hostile_methods_do_not_grow_metric_labels(client: TestClient, image: Image) -> None:
    for method in ("PROPFIND", "MKCOL", "LOCK"):
        await client.request(method, "/v2/")
    text = await (await client.get("/metrics")).text()
    assert "PROPFIND" not in text and 'method="OTHER"' in text
