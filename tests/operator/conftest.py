"""Fixtures for operator tests: the emulated API server, the kubelet, the operator itself.

The operator runs in-process (``running.operate`` as an asyncio task, the same function
``niximage operator`` runs) against ``apiserver.ApiServer`` on 127.0.0.1, logging in
through a kubeconfig as in any cluster. Every NixImage the server ever stored must
validate against the CRD's schema, strictly (no field a real server would prune).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

# The harness modules (apiserver, kubelet) sit beside this file; with --import-mode=
# importlib pytest does not put this folder on sys.path, so say it here, once.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kmock  # noqa: E402
from apiserver import ApiServer, schema_problems  # noqa: E402
from operator_harness import (  # noqa: E402
    CRD_PATH,
    NAMESPACE,
    TESTPKGS,
    RunningOperator,
    kubeconfig_for,
    operator_settings,
)

from kubesupport.kubelet import Gate, Kubelet, ProcessRuntime  # noqa: E402
from niximage_operator import running  # noqa: E402


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="session")
def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="session")
def testpkgs_source() -> str:
    """The offline package set, pinned as a deployment would pin it in the builder image."""
    if shutil.which("nix") is None:
        pytest.skip("needs Nix (the builder runs for real)")
    narhash = subprocess.run(
        [
            "nix",
            "--extra-experimental-features",
            "nix-command",
            "hash",
            "path",
            "--type",
            "sha256",
            "--sri",
            str(TESTPKGS),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"path:{TESTPKGS}#{narhash}"


@pytest_asyncio.fixture
async def apiserver(
    crd: dict[str, Any], crd_schema: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ApiServer]:
    server = ApiServer()
    async with server, kmock.Server(server) as http:
        server.install_crd(crd)
        for namespace in (NAMESPACE, "team-b"):
            server.create_namespace(namespace)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(str(http.url).rstrip("/"))))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield server
        problems = schema_problems(server.written("niximages"), crd_schema)
        assert not problems, "stored NixImages break the CRD schema:\n" + "\n".join(problems)
        misdirected = server.status_writes_to_main_endpoint("niximages")
        assert not misdirected, "status written to the main endpoint:\n" + "\n".join(misdirected)
        forbidden = sorted(server.accesses(OPERATOR_AGENTS) - allowed_by(cluster_role()))
        assert not forbidden, (
            f"the operator needs more than examples/operator.yaml grants: {forbidden}"
        )


OPERATOR_AGENTS = ("kopf/", "niximage-operator/")
"""User-Agents of the operator's two clients: kopf's own, and kube.py's."""


def cluster_role() -> dict[str, Any]:
    documents = yaml.safe_load_all((CRD_PATH.parents[1] / "examples" / "operator.yaml").read_text())
    return next(d for d in documents if d and d.get("kind") == "ClusterRole")


def allowed_by(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (verb, group, resource)
        for rule in role["rules"]
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path


@pytest_asyncio.fixture
async def kubelet(apiserver: ApiServer) -> AsyncIterator[Kubelet]:
    runtime = ProcessRuntime(Gate())
    node = Kubelet(str(apiserver.url), runtime)
    await node.start()
    yield node
    await node.stop()


OperatorFactory = Callable[..., Awaitable[RunningOperator]]


@pytest.fixture(autouse=True)
def no_ultimate_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf SIGKILLs its own thread — here, the whole test process — ten minutes after a
    cancellation it did not ask for; tests cancel it on purpose."""
    tuned = running.kopf_settings

    def kopf_settings(config: Any) -> Any:
        settings = tuned(config)
        settings.process.ultimate_exiting_timeout = None
        return settings

    monkeypatch.setattr(running, "kopf_settings", kopf_settings)


@pytest_asyncio.fixture
async def start_operator(
    apiserver: ApiServer, storage_dir: Path, testpkgs_source: str
) -> AsyncIterator[OperatorFactory]:
    started: list[RunningOperator] = []

    async def start(**overrides: Any) -> RunningOperator:
        operator = RunningOperator(operator_settings(storage_dir, testpkgs_source, **overrides))
        await operator.start()
        started.append(operator)
        return operator

    yield start
    for operator in started:
        await operator.stop()
