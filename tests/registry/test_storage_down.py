"""Fault 5: with GCS down, a pull gets 503 with ``Retry-After`` within seconds (``niximage
serve --storage-deadline``, default 5 s), not after the library's two-minute retries:
kubelets and containerd give up long before that. The real process against a
fake-gcs-server that is killed mid-run."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from niximage_core.storage.gcs import GcsStorage
from tests.registry.support import RegistryProcess, write_images
from tests.storage.gcs_emulator import GcsEmulator, own_emulator

pytestmark = pytest.mark.gcs
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def emulator() -> Iterator[GcsEmulator]:
    """An emulator of this test's own: it is killed."""
    yield from own_emulator()


def status_after(url: str, method: str = "GET") -> tuple[int, float, str | None]:
    started = time.monotonic()
    request = urllib.request.Request(url, method=method)
    try:
        with LOCAL.open(request, timeout=60) as response:
            return response.status, time.monotonic() - started, None
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, time.monotonic() - started, exc.headers.get("Retry-After")


def test_storage_down_is_503_within_the_deadline(emulator: GcsEmulator) -> None:
    bucket = f"down-{uuid.uuid4().hex[:8]}"
    emulator.create_bucket(bucket)
    image = write_images(GcsStorage(bucket, "registry", emulator.client()))  # type: ignore[arg-type]
    environment = {"STORAGE_EMULATOR_HOST": emulator.url, "GOOGLE_CLOUD_PROJECT": "test"}
    with RegistryProcess(
        f"gs://{bucket}/registry", "--storage-deadline", "3", "--tag-cache-ttl", "0",
        env=environment,
    ) as registry:  # fmt: skip
        manifest = f"{registry.url}/v2/test/app/manifests/latest"
        assert status_after(manifest)[0] == 200
        emulator.kill()
        for url, method in [
            (manifest, "GET"),
            (f"{registry.url}/v2/test/app/blobs/{image.layer_digest}", "HEAD"),
        ]:
            status, seconds, retry_after = status_after(url, method)
            assert status == 503 and retry_after is not None, (url, status)
            assert seconds < 15, f"{method} {url} took {seconds:.0f} s"
