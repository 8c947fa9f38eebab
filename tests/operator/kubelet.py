"""The kubelet of emulator tests: it runs the pods the operator creates.

It watches pods through the API like a kubelet, marks each one Running, runs it, and
writes the outcome to the pod's ``/status`` as a kubelet does: phase Succeeded or Failed,
``containerStatuses[].state.terminated`` with the exit code, and as message the file at
``terminationMessagePath`` (or, with ``FallbackToLogsOnError`` and an empty file after a
failure, the log's tail: at most 80 lines / 2048 bytes, as the kubelet takes).

How a pod runs is up to its runtime: ``ProcessRuntime`` runs the container's real command
(``niximage build …``) as a local process, with the termination-log path mapped to a file;
``ScriptedRuntime`` answers from a script (for failures no real build can produce, such as
an eviction). Either can be held at a gate, to stop the world mid-build.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from apiserver import now_text

from testsupport import env as builder_env

MESSAGE_LIMIT = 4096
LOG_FALLBACK_BYTES = 2048
LOG_FALLBACK_LINES = 80


@dataclass(frozen=True)
class Termination:
    exit_code: int
    message: str = ""
    pod_reason: str = ""
    """A pod-level failure (Evicted, DeadlineExceeded): the container state is left out."""
    pod_message: str = ""
    container_reason: str = ""


Runtime = Callable[[dict[str, Any]], Awaitable[Termination]]


class Gate:
    """Holds every run until opened; counts the runs that reached it."""

    def __init__(self, open_: bool = True) -> None:
        self._event = asyncio.Event()
        self.arrived = 0
        if open_:
            self._event.set()

    def open(self) -> None:
        self._event.set()

    def close(self) -> None:
        self._event.clear()

    async def wait(self) -> None:
        self.arrived += 1
        await self._event.wait()


class ProcessRuntime:
    """Runs the builder container's command here: ``niximage`` is this checkout's CLI."""

    def __init__(self, gate: Gate | None = None) -> None:
        self.gate = gate or Gate()
        self.commands: list[list[str]] = []

    async def __call__(self, pod: dict[str, Any]) -> Termination:
        await self.gate.wait()
        container = pod["spec"]["containers"][0]
        command = list(container["command"])
        self.commands.append(command)
        with tempfile.TemporaryDirectory(prefix="kubelet-") as scratch:
            log_path = container.get("terminationMessagePath", "/dev/termination-log")
            local_log = Path(scratch) / "termination-log"
            local_log.touch()
            argv = [str(local_log) if arg == log_path else arg for arg in command]
            if argv[0] == "niximage":
                argv = [sys.executable, "-m", "niximage_builder", *argv[1:]]
            environment = builder_env()
            environment.update({e["name"]: e.get("value", "") for e in container.get("env", ())})
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
            try:
                output, _ = await process.communicate()
            except asyncio.CancelledError:  # the pod was deleted: kill it, as a kubelet does
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                await process.wait()
                raise
            message = local_log.read_text()
        code = process.returncode or 0
        policy = container.get("terminationMessagePolicy", "File")
        if not message and code != 0 and policy == "FallbackToLogsOnError":
            tail = output.decode(errors="replace").splitlines()[-LOG_FALLBACK_LINES:]
            message = "\n".join(tail)[-LOG_FALLBACK_BYTES:]
        reason = "Completed" if code == 0 else "Error"
        return Termination(code, message[:MESSAGE_LIMIT], container_reason=reason)


Scripted = Termination | Callable[[dict[str, Any]], Termination]


class ScriptedRuntime:
    """Answers each run from ``script`` (in order; an entry may be a function of the pod),
    then delegates to ``then``."""

    def __init__(self, script: list[Scripted], then: Runtime | None = None) -> None:
        self.script = list(script)
        self.then = then

    async def __call__(self, pod: dict[str, Any]) -> Termination:
        if self.script:
            entry = self.script.pop(0)
            return entry if isinstance(entry, Termination) else entry(pod)
        if self.then is None:
            raise AssertionError(f"no scripted outcome left for pod {pod['metadata']['name']}")
        return await self.then(pod)


def summary(pod: dict[str, Any], **fields: Any) -> str:
    """A builder termination message for ``pod`` (BuildResult.termination_message's shape)."""
    key = pod["metadata"]["annotations"]["niximage.dev/build-key"]
    return json.dumps({"buildKey": key, **fields}, sort_keys=True)


class Kubelet:
    """Watches pods and runs each new one once, with ``runtime``."""

    def __init__(self, base_url: str, runtime: Runtime) -> None:
        self.base_url = base_url.rstrip("/")
        self.runtime = runtime
        self.runs: dict[tuple[str, str], tuple[str, asyncio.Task[None]]] = {}
        """(namespace, name) → (pod uid, its run)."""
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": "kubelet/emulated"})
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *(run for _, run in self.runs.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _follow(self) -> None:
        assert self._session is not None
        url = f"{self.base_url}/api/v1/pods"
        version = ""
        while True:
            params = {"watch": "true", "timeoutSeconds": "30"}
            if version:
                params["resourceVersion"] = version
            async with self._session.get(url, params=params) as response:
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    pod = event["object"]
                    version = pod["metadata"].get("resourceVersion", version)
                    self._see(event["type"], pod)

    def _see(self, event_type: str, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        uid = pod["metadata"]["uid"]
        known_uid, run = self.runs.get(key, ("", None))
        if event_type == "DELETED":
            if run is not None and known_uid == uid:
                run.cancel()
            return
        pending = pod.get("status", {}).get("phase", "Pending") == "Pending"
        if known_uid != uid and pending:
            self.runs[key] = (uid, asyncio.create_task(self._run(pod)))

    async def _run(self, pod: dict[str, Any]) -> None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        started = now_text()
        await self._status(
            namespace,
            name,
            {
                "phase": "Running",
                "startTime": started,
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container["image"],
                        "ready": True,
                        "restartCount": 0,
                        "started": True,
                        "state": {"running": {"startedAt": started}},
                    }
                ],
            },
        )
        outcome = await self.runtime(pod)
        status: dict[str, Any] = {"phase": "Succeeded" if outcome.exit_code == 0 else "Failed"}
        if outcome.pod_reason:
            status.update(reason=outcome.pod_reason, message=outcome.pod_message)
            state: dict[str, Any] = {}
        else:
            default_reason = "Completed" if outcome.exit_code == 0 else "Error"
            state = {
                "terminated": {
                    "exitCode": outcome.exit_code,
                    "reason": outcome.container_reason or default_reason,
                    "message": outcome.message,
                    "startedAt": started,
                    "finishedAt": now_text(),
                }
            }
        status["containerStatuses"] = [
            {
                "name": container["name"],
                "image": container["image"],
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": state,
            }
        ]
        await self._status(namespace, name, status)

    async def _status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        assert self._session is not None
        url = f"{self.base_url}/api/v1/namespaces/{namespace}/pods/{name}/status"
        async with self._session.patch(
            url,
            data=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        ) as response:
            if response.status == 404:
                return  # deleted meanwhile
            response.raise_for_status()
