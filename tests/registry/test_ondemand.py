"""On-demand builds with a fake build function: single flight, bounds, failures, patience.

The fake stands in for ``build.build_image`` (same signature): it counts its calls, takes
a while, and writes a real manifest to storage. The real pipeline is exercised by
test_clients.py (podman pulls an on-demand image built with Nix).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest

from niximage_core import imagespec, layout, manifest, sources
from niximage_core.digest import Digest
from niximage_core.errors import NixFailure, PackagesNotFound
from niximage_core.result import BuildResult
from niximage_registry.app import AppSettings
from niximage_registry.ondemand import OnDemandSettings

pytestmark = pytest.mark.asyncio

SOURCE = sources.parse_source("path:/nonexistent/testpkgs#sha256-" + "B" * 43 + "=")


class FakeBuild:
    """Counts builds per package set; ``delay`` seconds each; honours the cancel event."""

    def __init__(self, delay: float = 0.3) -> None:
        self.delay = delay
        self.calls: list[tuple[str, ...]] = []
        self.finished = threading.Event()
        self._lock = threading.Lock()

    def __call__(
        self,
        spec: imagespec.ImageSpec,
        storage: Any,
        cancel: threading.Event | None,
    ) -> BuildResult:
        with self._lock:
            self.calls.append(spec.packages)
        deadline = time.monotonic() + self.delay
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise NixFailure("BuildFailed", "cancelled")
            time.sleep(0.01)
        missing = [p for p in spec.packages if p.startswith("nope")]
        if missing:
            raise PackagesNotFound(missing)
        if "broken" in spec.packages:
            raise NixFailure(
                "BuildFailed",
                "a 'aarch64-linux' with features {} is required to build "
                "'/nix/store/0123456789abcdfghijklmnpqrsvwxyz-broken.drv', but I am a "
                "'x86_64-linux' with features {benchmark, big-parallel, kvm, nixos-test}",
            )
        config = manifest.Blob(manifest.OCI_CONFIG, json.dumps({"p": spec.packages}).encode())
        image = manifest.image_manifest(spec, config, [])
        storage.put_blob(config.data)
        digest = storage.put_blob(image.data)
        self.finished.set()
        return BuildResult(
            buildKey=spec.build_key(),
            spec=spec.model_dump(mode="json"),
            ok=True,
            manifestDigest=str(digest),
            mediaType=image.media_type,
        )


async def on_demand(make_client: Any, fake: FakeBuild, **options: Any) -> Any:
    settings = AppSettings(ondemand=OnDemandSettings(source=SOURCE, build=fake, **options))
    return await make_client(settings)


async def test_twenty_first_pulls_run_one_build(make_client: Any, store: Any) -> None:
    fake = FakeBuild(delay=0.5)
    client = await on_demand(make_client, fake)
    responses = await asyncio.gather(
        *(client.get("/v2/shell/jq/manifests/latest") for _ in range(20))
    )
    assert [r.status for r in responses] == [200] * 20
    digests = {r.headers["Docker-Content-Digest"] for r in responses}
    assert len(digests) == 1 and len(fake.calls) == 1
    assert "bashInteractive" in fake.calls[0] and "jq" in fake.calls[0]
    stored = store.read(layout.tag_path("shell/jq", "latest", pulled=True)).decode()
    assert stored == digests.pop()
    again = await client.get("/v2/shell/jq/manifests/latest")
    assert again.status == 200 and len(fake.calls) == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'niximage_registry_builds_total{result="ok",worker="0"} 1.0' in metrics
    assert 'niximage_registry_build_waits_total{started="false",worker="0"} 19.0' in metrics
    assert "niximage_registry_build_duration_seconds_count" in metrics


async def test_names_sharing_a_build_key_get_their_own_tags(make_client: Any, store: Any) -> None:
    fake = FakeBuild(delay=0.3)
    client = await on_demand(make_client, fake)
    first, second = await asyncio.gather(
        client.get("/v2/jq/bash/manifests/latest"), client.get("/v2/bash/jq/manifests/latest")
    )
    assert first.status == second.status == 200 and len(fake.calls) == 1
    assert store.read(layout.tag_path("jq/bash", "latest", pulled=True)) == store.read(
        layout.tag_path("bash/jq", "latest", pulled=True)
    )


async def test_a_pull_never_claims_the_tag_of_a_nix_image(make_client: Any, store: Any) -> None:
    """On-demand tags live apart (tags/_pulls/): a pull of team/app:latest before NixImage
    app in namespace team is Ready leaves that NixImage's tag alone, and once the NixImage's
    tag exists the registry serves it."""
    fake = FakeBuild(delay=0.05)
    client = await on_demand(make_client, fake)
    pulled = await client.get("/v2/jq/bash/manifests/latest")  # packages jq and bash
    assert pulled.status == 200
    assert store.read(layout.tag_path("jq/bash", "latest")) is None  # the NixImage's space
    other = manifest.Blob(manifest.OCI_CONFIG, b'{"nix-image": true}')
    image = manifest.image_manifest(imagespec.make_spec(["jq"], SOURCE), other, [])
    store.put_blob(other.data)
    store.put_blob(image.data)
    result = BuildResult(
        buildKey="ab" * 32, spec={}, ok=True, manifestDigest=str(image.digest),
        configDigest=str(other.digest), mediaType=image.media_type,
    )  # fmt: skip
    layout.record_tag(store, "jq/bash", "latest", result)  # what the operator writes
    await asyncio.sleep(1.1)  # the registry's tag cache (1 s)
    served = await client.get("/v2/jq/bash/manifests/latest")
    assert served.headers["Docker-Content-Digest"] == str(image.digest)
    assert store.read(layout.tag_path("jq/bash", "latest", pulled=True)) is not None
    listed = await (await client.get("/v2/jq/bash/tags/list")).json()
    assert listed["tags"] == ["latest"]


async def test_missing_packages_are_404_naming_them(make_client: Any) -> None:
    fake = FakeBuild(delay=0.05)
    client = await on_demand(make_client, fake)
    response = await client.get("/v2/jq/nope1/nope2/manifests/latest")
    assert response.status == 404
    error = (await response.json())["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "nope1" in error["message"] and "nope2" in error["message"]
    assert error["detail"]["missingPackages"] == ["nope1", "nope2"]
    again = await client.head("/v2/jq/nope1/nope2/manifests/latest")
    assert again.status == 404 and len(fake.calls) == 1  # remembered, Nix not run again


async def test_failed_build_is_404_with_a_short_reason(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The client learns the kind of failure; Nix's text (store paths, the builder's system
    features) stays in the log."""
    client = await on_demand(make_client, FakeBuild(delay=0.01))
    with caplog.at_level("WARNING", logger="niximage_registry.ondemand"):
        response = await client.get("/v2/broken/manifests/latest")
    assert response.status == 404
    error = (await response.json())["errors"][0]
    assert error["message"] == (
        "building broken failed: a package of the image failed to build (BuildFailed; "
        "the registry's log has the details)"
    )
    assert "/nix/store" not in json.dumps(error) and "features" not in json.dumps(error)
    assert "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-broken.drv" in caplog.text


async def test_invalid_package_name_is_400(make_client: Any) -> None:
    fake = FakeBuild()
    client = await on_demand(make_client, fake)
    response = await client.get("/v2/a.b.c.d.e.f.g.h.i/manifests/latest")
    assert response.status == 400
    assert (await response.json())["errors"][0]["code"] == "NAME_INVALID"
    assert fake.calls == []


async def test_client_disconnect_does_not_cancel_the_build(make_client: Any) -> None:
    fake = FakeBuild(delay=1.0)
    client = await on_demand(make_client, fake)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.get("/v2/shell/htop/manifests/latest"), 0.2)
    await asyncio.get_running_loop().run_in_executor(None, fake.finished.wait, 5)
    started = time.monotonic()
    response = await client.get("/v2/shell/htop/manifests/latest")
    assert response.status == 200 and len(fake.calls) == 1
    assert time.monotonic() - started < 0.5  # served from storage, not rebuilt


async def test_impatient_client_gets_429_and_the_build_goes_on(make_client: Any) -> None:
    fake = FakeBuild(delay=1.0)
    client = await on_demand(make_client, fake, wait=0.2)
    response = await client.get("/v2/git/manifests/latest")
    assert response.status == 429 and response.headers["Retry-After"]
    assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    await asyncio.get_running_loop().run_in_executor(None, fake.finished.wait, 5)
    for _ in range(50):  # the tag is recorded right after the build returns
        ok = await client.get("/v2/git/manifests/latest")
        if ok.status == 200:
            break
        await asyncio.sleep(0.05)
    assert ok.status == 200 and len(fake.calls) == 1


async def test_build_queue_is_bounded(make_client: Any) -> None:
    fake = FakeBuild(delay=0.5)
    client = await on_demand(make_client, fake, max_builds=1, max_queued=1)
    responses = await asyncio.gather(
        *(client.get(f"/v2/pkg{n}/manifests/latest") for n in range(3))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 200, 429]


async def test_only_latest_is_built(make_client: Any) -> None:
    fake = FakeBuild()
    client = await on_demand(make_client, fake)
    response = await client.get("/v2/shell/jq/manifests/v1")
    assert response.status == 404 and fake.calls == []


async def test_stored_tags_win(make_client: Any, image: Any) -> None:
    fake = FakeBuild()
    client = await on_demand(make_client, fake)
    response = await client.get("/v2/test/app/manifests/latest")
    assert response.status == 200 and fake.calls == []
    assert response.headers["Docker-Content-Digest"] == str(image.manifest.digest)


async def test_without_on_demand_nothing_is_built(client: Any) -> None:
    response = await client.get("/v2/shell/jq/manifests/latest")
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_blobs_of_a_built_image_are_served(make_client: Any) -> None:
    client = await on_demand(make_client, FakeBuild(delay=0.01))
    response = await client.get("/v2/jq/manifests/latest")
    config = json.loads(await response.read())["config"]["digest"]
    blob = await client.get(f"/v2/jq/blobs/{config}")
    assert blob.status == 200 and Digest.of(await blob.read()) == Digest.parse(config)
