"""Fixtures: a filesystem storage holding synthetic images (``support.write_images``), and
in-process test clients over it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from niximage_core.storage.filesystem import FilesystemStorage
from niximage_registry.app import AppSettings, make_app
from niximage_registry.runner import JsonErrorsRunner
from tests.registry.support import Image, write_images


class JsonErrorsTestServer(TestServer):
    """TestServer with the runner ``niximage serve`` uses (JSON for parser errors)."""

    async def _make_runner(self, **kwargs: object) -> JsonErrorsRunner:
        return JsonErrorsRunner(self.app, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(tmp_path / "store")


@pytest.fixture
def image(store: FilesystemStorage) -> Image:
    return write_images(store)


ClientFactory = Callable[..., "AsyncIterator[TestClient]"]


@pytest_asyncio.fixture
async def make_client(
    store: FilesystemStorage,
) -> AsyncIterator[Callable[..., object]]:
    """``await make_client(settings=None, storage=store)``."""
    clients: list[TestClient] = []

    async def make(settings: AppSettings | None = None, storage: object = None) -> TestClient:
        app = make_app(storage or store, settings)  # type: ignore[arg-type]
        client = TestClient(JsonErrorsTestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest_asyncio.fixture
async def client(make_client: Callable[..., object], image: Image) -> TestClient:
    return await make_client()  # type: ignore[misc,no-any-return]
