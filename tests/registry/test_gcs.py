"""GCS-backed registry against fake-gcs-server: 307 to signed URLs, or streamed blobs.

The emulator does not check signatures but serves objects at signed URLs, so a client that
follows the redirect really downloads the blob from "storage" (the emulator), not from us.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import ClientSession

from niximage_registry.app import AppSettings
from tests.registry.support import Image, write_images
from tests.storage.gcs_emulator import GcsEmulator, own_emulator

pytestmark = [pytest.mark.gcs, pytest.mark.asyncio]


@pytest.fixture(scope="module")
def emulator() -> Iterator[GcsEmulator]:
    yield from own_emulator()


def signing_credentials() -> Any:
    """Service-account credentials with a key made up here: they sign offline."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return service_account.Credentials.from_service_account_info(
        {
            "type": "service_account",
            "project_id": "test",
            "private_key_id": "test-key",
            "private_key": pem,
            "client_email": "registry@test.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )


class SigningGcs:
    """Reads through an anonymous client; signs with a service-account key.

    Against the emulator, API calls with service-account credentials would first try to
    fetch an OAuth token from Google (unreachable here); signing needs no call at all.
    """

    def __init__(self, reader: Any, signer: Any) -> None:
        self._reader = reader
        self._signer = signer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def blob_delivery(self, digest: Any, url_ttl: int | None) -> Any:
        return self._signer.blob_delivery(digest, url_ttl)


def gcs_storage(emulator: GcsEmulator, bucket: str, signing: bool) -> Any:
    from niximage_core.storage.gcs import GcsStorage

    reader = GcsStorage(bucket, "registry", emulator.client())
    if not signing:
        return reader
    signer = GcsStorage(bucket, "registry", emulator.client(credentials=signing_credentials()))
    return SigningGcs(reader, signer)


@pytest.fixture
def bucket(emulator: GcsEmulator) -> tuple[str, Image]:
    name = f"r-{uuid.uuid4().hex[:16]}"
    emulator.create_bucket(name)
    storage = gcs_storage(emulator, name, signing=False)
    image = write_images(storage)
    storage.close()
    return name, image


async def test_blob_get_redirects_to_a_signed_url(
    make_client: Any, emulator: GcsEmulator, bucket: tuple[str, Image]
) -> None:
    name, image = bucket
    storage = gcs_storage(emulator, name, signing=True)
    client = await make_client(AppSettings(signed_url_ttl=120), storage=storage)
    path = f"/v2/test/app/blobs/{image.layer_digest}"
    response = await client.get(path, allow_redirects=False)
    assert response.status == 307
    location = response.headers["Location"]
    parsed = urllib.parse.urlsplit(location)
    assert f"{parsed.scheme}://{parsed.netloc}" == emulator.url
    query = urllib.parse.parse_qs(parsed.query)
    assert query["X-Goog-Expires"] == ["120"] and "X-Goog-Signature" in query
    async with ClientSession() as session, session.get(location) as followed:
        assert await followed.read() == image.layer
    head = await client.head(path, allow_redirects=False)
    assert head.status == 200 and head.headers["Content-Length"] == str(len(image.layer))
    assert head.headers["Docker-Content-Digest"] == str(image.layer_digest)
    unknown = await client.get("/v2/test/app/blobs/sha256:" + "0" * 64, allow_redirects=False)
    assert unknown.status == 404
    assert (await unknown.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    manifest = await client.get("/v2/test/app/manifests/latest", allow_redirects=False)
    assert manifest.status == 200 and await manifest.read() == image.manifest.data
    metrics = await (await client.get("/metrics")).text()
    assert 'niximage_registry_blob_redirects_total{worker="0"} 1.0' in metrics


async def test_blobs_are_streamed_without_signing_credentials(
    make_client: Any, emulator: GcsEmulator, bucket: tuple[str, Image]
) -> None:
    name, image = bucket
    client = await make_client(storage=gcs_storage(emulator, name, signing=False))
    path = f"/v2/test/app/blobs/{image.layer_digest}"
    response = await client.get(path, allow_redirects=False)
    assert response.status == 200 and await response.read() == image.layer
    assert response.headers["Content-Length"] == str(len(image.layer))
    ranged = await client.get(path, headers={"Range": "bytes=10-19"})
    assert ranged.status == 206 and await ranged.read() == image.layer[10:20]
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{len(image.layer)}"
    big = await client.get(f"/v2/test/app/blobs/{image.big}")
    assert await big.read() == b"x" * (5 * 1024 * 1024)
    tags = await client.get("/v2/test/app/tags/list")
    assert json.loads(await tags.read())["tags"] == ["docker", "index", "latest"]


async def test_no_redirect_streams_even_when_signing_works(
    make_client: Any, emulator: GcsEmulator, bucket: tuple[str, Image]
) -> None:
    name, image = bucket
    storage = gcs_storage(emulator, name, signing=True)
    client = await make_client(AppSettings(redirect_blobs=False), storage=storage)
    response = await client.get(f"/v2/test/app/blobs/{image.layer_digest}", allow_redirects=False)
    assert response.status == 200 and await response.read() == image.layer


@pytest.mark.clients
async def test_skopeo_follows_the_redirect(
    make_client: Any, emulator: GcsEmulator, bucket: tuple[str, Image], tmp_path: Any
) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    name, image = bucket
    client = await make_client(storage=gcs_storage(emulator, name, signing=True))
    layout = tmp_path / "layout"
    process = await asyncio.create_subprocess_exec(
        "skopeo", "copy", "--src-tls-verify=false",
        f"docker://127.0.0.1:{client.port}/test/app:latest", f"oci:{layout}:img",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    assert (layout / "blobs" / "sha256" / image.layer_digest.hex).read_bytes() == image.layer
    metrics = await (await client.get("/metrics")).text()
    assert 'niximage_registry_blob_redirects_total{worker="0"} 2.0' in metrics  # config, layer
