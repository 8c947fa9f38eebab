"""The kubelet of the tests: it runs the pods the operator creates, on the emulator or on a
real API server (which has no kubelet and no scheduler of its own here).

It watches pods through the API like a kubelet, marks each one Running, runs it, and
writes the outcome to the pod's ``/status`` as a kubelet does: phase Succeeded or Failed,
``containerStatuses[].state.terminated`` with the exit code, and as message the file at
``terminationMessagePath`` (or, with ``FallbackToLogsOnError`` and an empty file after a
failure, the log's tail: at most 80 lines / 2048 bytes, as the kubelet takes).

With ``nodes`` it also plays the scheduler, as a real cluster has one: it registers each
node (labels ``kubernetes.io/arch``/``os``, status Ready), binds a new pod to the first
node whose labels its ``nodeSelector`` matches (the ``binding`` subresource), or marks it
``PodScheduled=False``, reason ``Unschedulable``, with the scheduler's message; and it runs
only the pods bound to the nodes it runs (``runs=True``). Without ``nodes`` (the emulator)
it runs every pod.

How a pod runs is up to its runtime: ``ProcessRuntime`` runs the container's real command
(``niximage build …``) as a local process, with the pod's environment, the termination-log
path mapped to a file and its volumes mapped to directories here; ``ScriptedRuntime``
answers from a script (for failures no real build can produce, such as an eviction).
Either can be held at a gate, to stop the world mid-build.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl as ssl_module
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from testsupport import env as builder_env

MESSAGE_LIMIT = 4096
LOG_FALLBACK_BYTES = 2048
LOG_FALLBACK_LINES = 80
NODE_PATHS = ("/nix",)
"""Mounts at these paths are the node's own directory: a builder's Nix store volume is this
machine's store (an empty store would rebuild the package set from source)."""


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Connection:
    """Where the API server is, and the TLS context to reach it as (None: plain HTTP)."""

    url: str
    ssl: ssl_module.SSLContext | None = None


@dataclass(frozen=True)
class Node:
    name: str
    arch: str = "amd64"
    runs: bool = True
    """Pods bound here run (False: a node that takes pods and never starts them)."""

    @property
    def labels(self) -> dict[str, str]:
        return {
            "kubernetes.io/arch": self.arch,
            "kubernetes.io/os": "linux",
            "kubernetes.io/hostname": self.name,
        }


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
    """Runs the builder container's command here: ``niximage`` is this checkout's CLI.

    ``claims`` maps PersistentVolumeClaim names to directories here; an ``emptyDir`` is a
    fresh directory per pod. A path under a mount, in the command or the environment,
    becomes the same path under the volume's directory, as the container would see it.
    """

    def __init__(self, gate: Gate | None = None, claims: dict[str, Path] | None = None) -> None:
        self.gate = gate or Gate()
        self.claims = dict(claims or {})
        self.commands: list[list[str]] = []

    def _mounts(
        self, pod: dict[str, Any], container: dict[str, Any], scratch: Path
    ) -> dict[str, str]:
        """mountPath → directory here, for every volume the container mounts."""
        volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes", ())}
        mapped: dict[str, str] = {}
        for mount in container.get("volumeMounts", ()):
            path, volume = mount["mountPath"], volumes[mount["name"]]
            if path in NODE_PATHS:
                continue
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if claim not in self.claims:
                    raise AssertionError(f"pod mounts claim {claim!r}, which the test did not map")
                mapped[path] = str(self.claims[claim])
            elif "emptyDir" in volume:
                local = scratch / "volumes" / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                mapped[path] = str(local)
        return mapped

    async def __call__(self, pod: dict[str, Any]) -> Termination:
        await self.gate.wait()
        container = pod["spec"]["containers"][0]
        command = list(container["command"])
        self.commands.append(command)
        with tempfile.TemporaryDirectory(prefix="kubelet-") as scratch:
            mounts = self._mounts(pod, container, Path(scratch))
            log_path = container.get("terminationMessagePath", "/dev/termination-log")
            local_log = Path(scratch) / "termination-log"
            local_log.touch()
            argv = [_mapped(arg, mounts) for arg in command]
            argv = [str(local_log) if arg == log_path else arg for arg in argv]
            if argv[0] == "niximage":
                argv = [sys.executable, "-m", "niximage_cli", *argv[1:]]
            environment = builder_env()
            environment.update(
                {e["name"]: _mapped(e.get("value", ""), mounts) for e in container.get("env", ())}
            )
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


def _mapped(value: str, mounts: dict[str, str]) -> str:
    """``value`` with a leading mount path replaced by the volume's directory here."""
    for path, local in mounts.items():
        if value == path or value.startswith(path.rstrip("/") + "/"):
            return local + value[len(path.rstrip("/")) :]
    return value


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

    def __init__(
        self,
        connection: Connection | str,
        runtime: Runtime,
        nodes: list[Node] | None = None,
    ) -> None:
        if isinstance(connection, str):
            connection = Connection(connection)
        self.connection = Connection(connection.url.rstrip("/"), connection.ssl)
        self.runtime = runtime
        self.nodes = list(nodes or ())
        self.runs: dict[tuple[str, str], tuple[str, asyncio.Task[None]]] = {}
        """(namespace, name) → (pod uid, its run)."""
        self.unschedulable: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return self.connection.url

    async def start(self) -> None:
        # The API server may never answer a TLS close: enable_cleanup_closed aborts such a
        # transport after two seconds, so none is left open when the loop goes.
        connector = aiohttp.TCPConnector(
            ssl=self.connection.ssl or False, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": "kubelet/stand-in"}
        )
        for node in self.nodes:
            await self._register(node)
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *(run for _, run in self.runs.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _register(self, node: Node) -> None:
        """A Node object as a kubelet registers it, then its Ready status."""
        assert self._session is not None
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": node.labels},
        }
        async with self._session.post(f"{self.base_url}/api/v1/nodes", json=body) as response:
            if response.status not in (201, 409):
                raise AssertionError(f"registering node {node.name}: {await response.text()}")
        now = now_text()
        status = {
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
            ],
            "nodeInfo": {"architecture": node.arch, "operatingSystem": "linux"},
        }  # fmt: skip
        await self._patch(f"/api/v1/nodes/{node.name}/status", {"status": status})

    async def _follow(self) -> None:
        """Watch every pod, resuming from the last version; on 410 Gone, from now."""
        assert self._session is not None
        url = f"{self.base_url}/api/v1/pods"
        version = ""
        while True:
            params = {"watch": "true", "timeoutSeconds": "30"}
            if version:
                params["resourceVersion"] = version
            try:
                async with self._session.get(url, params=params) as response:
                    if response.status != 200:
                        version = ""
                        await asyncio.sleep(0.5)
                        continue
                    async for line in response.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # e.g. 410: the version expired
                            version = ""
                            break
                        pod = event["object"]
                        version = pod["metadata"].get("resourceVersion", version)
                        await self._see(event["type"], pod)
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.5)  # the API server is away: as a kubelet, wait

    async def _see(self, event_type: str, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        uid = pod["metadata"]["uid"]
        known_uid, run = self.runs.get(key, ("", None))
        if event_type == "DELETED":
            if run is not None and known_uid == uid:
                run.cancel()
            return
        pending = pod.get("status", {}).get("phase", "Pending") == "Pending"
        if not pending or known_uid == uid or pod["metadata"].get("deletionTimestamp"):
            return
        if self.nodes:
            node_name = pod["spec"].get("nodeName")
            if not node_name:
                await self._schedule(pod)
                return
            node = next((n for n in self.nodes if n.name == node_name), None)
            if node is None or not node.runs:
                return
        self.runs[key] = (uid, asyncio.create_task(self._run(pod)))

    async def _schedule(self, pod: dict[str, Any]) -> None:
        """Bind to the first node the pod's nodeSelector matches, else say why not."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        wanted = pod["spec"].get("nodeSelector") or {}
        for node in self.nodes:
            if all(node.labels.get(k) == v for k, v in wanted.items()):
                binding = {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": name, "namespace": namespace},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node.name},
                }
                assert self._session is not None
                path = f"{self.base_url}/api/v1/namespaces/{namespace}/pods/{name}/binding"
                async with self._session.post(path, json=binding) as response:
                    if response.status not in (201, 404, 409):
                        raise AssertionError(f"binding {namespace}/{name}: {await response.text()}")
                return
        if (namespace, name) in self.unschedulable:
            return
        self.unschedulable.add((namespace, name))
        count = len(self.nodes)
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": f"0/{count} nodes are available: {count} node(s) didn't match Pod's "
            "node affinity/selector. preemption: 0/{count} nodes are available: "
            f"{count} Preemption is not helpful for scheduling.".replace("{count}", str(count)),
            "lastTransitionTime": now_text(),
        }
        await self._status(namespace, name, {"conditions": [condition]})

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
        await self._patch(f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": status})

    async def _patch(self, path: str, body: dict[str, Any]) -> None:
        """A merge patch through a status subresource, retried while the server is away."""
        assert self._session is not None
        for _ in range(120):
            try:
                async with self._session.patch(
                    self.base_url + path,
                    data=json.dumps(body),
                    headers={"Content-Type": "application/merge-patch+json"},
                ) as response:
                    if response.status == 404:
                        return  # deleted meanwhile
                    if response.status < 500:
                        if response.status >= 400:
                            raise AssertionError(f"PATCH {path}: {await response.text()}")
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(1)
        raise AssertionError(f"PATCH {path}: the API server did not answer for two minutes")
