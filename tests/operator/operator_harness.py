"""Test harness shared by the operator tests: settings, the operator as a task, waiting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apiserver import ApiServer

from niximage_core import layout
from niximage_core.storage import factory
from niximage_operator import running
from niximage_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "niximage.yaml"
TESTPKGS = ROOT / "nix" / "testpkgs"
REGISTRY = "registry.test:5000"
NAMESPACE = "default"


def kubeconfig_for(server: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        "current-context": "emulator",
    }


def operator_settings(storage: Path, source: str, **overrides: Any) -> OperatorSettings:
    """Settings as a deployment sets them, with short delays so retries fit in a test."""
    values: dict[str, Any] = {
        "storage": str(storage),
        "registry": REGISTRY,
        "builder_image": "niximage:test",
        "default_package_source": source,
        "max_concurrent_builds": 4,
        "retry_delay": 0.3,
        "retry_max_delay": 2.0,
        "queue_recheck": 0.5,
        "storage_retry_delay": 0.3,
        "watch_timeout": 20,
        **overrides,
    }
    return OperatorSettings(**values)


class RunningOperator:
    """The operator, running in a thread with its own event loop.

    kopf cancels every task of its loop that appeared after it started when it stops
    (``run_tasks``): the API server and the kubelet must not live in that loop. This is
    what ``kopf.testing.KopfRunner`` does too, minus the command line.
    """

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.runs = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._task = loop.create_task(
            running.operate(self.settings, stop_flag=self._stop, ready_flag=self._ready)
        )
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def start(self) -> None:
        assert self._thread is None or not self._thread.is_alive()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error = None
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)
        self._thread.start()
        self.runs += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not self._ready.is_set():
            if not self._thread.is_alive():
                raise AssertionError(f"the operator exited at start: {self.error!r}")
            if loop.time() > deadline:
                raise AssertionError("the operator did not become ready")
            await asyncio.sleep(0.02)

    async def kill(self) -> None:
        """An abrupt end: the operator's task is cancelled wherever it is."""
        if self._loop is not None and self._task is not None and not self._task.done():
            self._loop.call_soon_threadsafe(self._task.cancel)
        # kopf waits for a threading.Event stop flag in an executor thread; release that
        # thread too (the task is already cancelled, so nothing graceful happens).
        self._stop.set()
        await self._join()

    async def stop(self) -> None:
        self._stop.set()
        await self._join()

    async def _join(self) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            assert not self._thread.is_alive(), "the operator did not exit"


async def eventually(
    check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Poll until ``check()`` returns something truthy; return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check.__doc__ or check}")
        await asyncio.sleep(interval)


# ---- acting as the user, reading as the user ---------------------------------------------

API = "/apis/niximage.dev/v1alpha1"


def nix_image(name: str, packages: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "niximage.dev/v1alpha1",
        "kind": "NixImage",
        "metadata": {"name": name},
        "spec": {"packages": packages, **spec},
    }


async def apply(server: ApiServer, body: dict[str, Any], namespace: str = NAMESPACE) -> None:
    """``kubectl create -f``, over HTTP as kubectl does."""
    async with server.post(f"{API}/namespaces/{namespace}/niximages", json=body) as response:
        assert response.status == 201, await response.text()


async def change_spec(
    server: ApiServer, name: str, spec: dict[str, Any], namespace: str = NAMESPACE
) -> None:
    async with server.patch(
        f"{API}/namespaces/{namespace}/niximages/{name}",
        json={"spec": spec},
        headers={"Content-Type": "application/merge-patch+json"},
    ) as response:
        assert response.status == 200, await response.text()


async def delete(server: ApiServer, name: str, namespace: str = NAMESPACE) -> None:
    async with server.delete(f"{API}/namespaces/{namespace}/niximages/{name}") as response:
        assert response.status == 200, await response.text()


def condition(obj: dict[str, Any] | None, kind: str = "Ready") -> dict[str, Any]:
    for item in (obj or {}).get("status", {}).get("conditions", ()):
        if item["type"] == kind:
            return dict(item)
    return {}


def image(server: ApiServer, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    return server.find("niximages", namespace, name) or {}


def ready(server: ApiServer, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
    obj = image(server, name, namespace)
    return obj if condition(obj).get("status") == "True" else None


def reason_is(server: ApiServer, name: str, reason: str) -> dict[str, Any] | None:
    obj = image(server, name)
    return obj if condition(obj).get("reason") == reason else None


def phase_is(server: ApiServer, name: str, phase: str) -> dict[str, Any] | None:
    obj = image(server, name)
    return obj if obj.get("status", {}).get("phase") == phase else None


def pod_phase(server: ApiServer, name: str) -> str | None:
    return (server.find("pods", NAMESPACE, name) or {}).get("status", {}).get("phase")


def owners_of(server: ApiServer, pod: str) -> list[dict[str, Any]]:
    metadata = (server.find("pods", NAMESPACE, pod) or {}).get("metadata", {})
    return list(metadata.get("ownerReferences", []))


def pods_created(server: ApiServer) -> list[str]:
    return [name for plural, _, name in server.creations if plural == "pods"]


def events_about(server: ApiServer, name: str) -> list[tuple[str, str]]:
    return [
        (event["type"], event["reason"])
        for event in server.objects("events")
        if event["involvedObject"].get("name") == name
    ]


def tag_of(storage_dir: Path, repository: str, tag: str) -> str | None:
    digest = layout.read_tag(factory.open_storage(str(storage_dir)), repository, tag)
    return str(digest) if digest is not None else None
