"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

The binaries are the statically linked v1.36 ones of ``../shared/kube`` (a tarball,
unpacked once into the tools cache) or a directory named by ``$NIXIMAGE_KUBE_BIN``; etcd is
Debian's ``etcd-server``. Everything the servers need is made at start in a scratch
directory: a CA, the API server's serving certificate, client certificates (an admin in
``system:masters``, the controller manager), the service account signing key, an audit
policy. The API server runs with ``--authorization-mode=RBAC``, Pod Security admission
(on by default) and an audit log, so the authoriser and the admission chain are the real
ones. The controller manager runs only the controllers a cluster without nodes needs:
garbage collection, namespaces, service accounts and their tokens, the root CA ConfigMap.

``ControlPlane.start()`` returns once ``/readyz`` answers; ``stop()`` stops exactly the
processes it started (API server first: it would otherwise wait for etcd).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubesupport import helmtool

ROOT = Path(__file__).resolve().parents[2]
SHARED_KUBE = ROOT.parent / "shared" / "kube"
TARBALL = "kube-v1.36.2-linux-amd64.tar.xz"
BINARIES = ("kube-apiserver", "kube-controller-manager")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
)
"""What a cluster without kubelets needs. Node lifecycle stays off: it would taint the
stand-in nodes, which post no heartbeats, and evict their pods."""

AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "nonResourceURLs": ["/readyz*", "/livez*", "/healthz*"]},
        {"level": "Metadata"},
    ],
}


class Unavailable(Exception):
    """The binaries are not on this machine: the real-cluster tests skip, saying this."""


def kube_binaries() -> Path:
    """The directory holding kube-apiserver and kube-controller-manager.

    ``$NIXIMAGE_KUBE_BIN`` (a directory of binaries, or one holding the tarball), else
    ``../shared/kube``. A tarball is unpacked once into the tools cache (220 MB; atomic, so
    parallel runs never see half a binary).
    """
    source = Path(os.environ.get("NIXIMAGE_KUBE_BIN") or SHARED_KUBE)
    if all((source / name).is_file() for name in BINARIES):
        return source
    tarball = source / TARBALL
    if not tarball.is_file():
        raise Unavailable(f"no Kubernetes control plane binaries in {source} ($NIXIMAGE_KUBE_BIN)")
    target = helmtool.cache_dir() / TARBALL.removesuffix(".tar.xz")
    if all((target / name).is_file() for name in BINARIES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(str(target) + f".partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    with tarfile.open(tarball) as archive:
        archive.extractall(scratch, filter="data")
    with contextlib.suppress(OSError):  # another run was first: theirs is as good
        scratch.rename(target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def etcd_binary() -> Path:
    found = shutil.which("etcd")
    if found is None:
        raise Unavailable("no etcd (Debian's etcd-server; scripts/install.sh installs it)")
    return Path(found)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> None:
    """CA, serving and client certificates, and the service account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=niximage-test-ca",
             cwd=directory)  # fmt: skip
    (directory / "serving.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    certificates = {
        "apiserver": ("/CN=kube-apiserver", "serving.ext"),
        "admin": ("/O=system:masters/CN=niximage-test-admin", "client.ext"),
        "controller-manager": ("/CN=system:kube-controller-manager", "client.ext"),
    }
    for name, (subject, extensions) in certificates.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", subject, cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
                 "-extfile", extensions, cwd=directory)  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=directory)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)


def kubeconfig(server: str, ca: Path, user: dict[str, str], name: str = "test") -> dict[str, Any]:
    """A kubeconfig for ``server``; ``user`` is its ``users[].user`` stanza."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager, started in ``workdir``."""

    workdir: Path
    audit_mode: str = "blocking"
    """``blocking``: every request is in the audit log when its answer arrives (the RBAC
    tests read it right after); ``batch`` costs the API server less (benchmarks)."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api_port: int = 0
    etcd_port: int = 0

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def ssl_context(self) -> ssl.SSLContext:
        """TLS as the admin: verifies the API server, presents the admin certificate."""
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    # ---- starting and stopping -----------------------------------------------------------

    def start(self, timeout: float = 90) -> None:
        binaries = kube_binaries()
        etcd = etcd_binary()
        make_pki(self.pki)
        self.audit_log.unlink(missing_ok=True)
        (self.workdir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        self.etcd_port = free_port()
        peer, metrics = free_port(), free_port()
        data = self.workdir / "etcd"
        shutil.rmtree(data, ignore_errors=True)
        self._spawn("etcd", [
            str(etcd), "--name", "t", "--data-dir", str(data),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"t=http://127.0.0.1:{peer}",
            "--listen-metrics-urls", f"http://127.0.0.1:{metrics}",
        ])  # fmt: skip
        self.api_port = free_port()
        self.start_apiserver(binaries)
        self._write_kubeconfigs()
        self.wait_ready(timeout)
        controller_kubeconfig = str(self.workdir / "controller-manager.kubeconfig")
        self._spawn("kube-controller-manager", [
            str(binaries / "kube-controller-manager"),
            f"--kubeconfig={controller_kubeconfig}",
            f"--authentication-kubeconfig={controller_kubeconfig}",
            f"--authorization-kubeconfig={controller_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            "--use-service-account-credentials=true", "--leader-elect=false",
            f"--controllers={','.join(CONTROLLERS)}",
        ])  # fmt: skip

    def start_apiserver(self, binaries: Path | None = None) -> None:
        """(Re)start the API server on the same port, over the same etcd."""
        binaries = binaries or kube_binaries()
        pki = self.pki
        self._spawn("kube-apiserver", [
            str(binaries / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.api_port}",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            f"--audit-policy-file={self.workdir / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
            f"--audit-log-mode={self.audit_mode}",
            "--shutdown-delay-duration=0s",
            "--shutdown-watch-termination-grace-period=2s",
        ])  # fmt: skip

    def stop_apiserver(self) -> None:
        self._terminate("kube-apiserver")

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self._terminate(name)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            self.processes[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    def _terminate(self, name: str, grace: float = 20) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _write_kubeconfigs(self) -> None:
        pki = self.pki
        for name, file in (
            ("admin", self.admin_kubeconfig),
            ("controller-manager", self.workdir / "controller-manager.kubeconfig"),
        ):
            user = {"client-certificate": str(pki / f"{name}.crt"),
                    "client-key": str(pki / f"{name}.key")}  # fmt: skip
            file.write_text(yaml.safe_dump(kubeconfig(self.url, pki / "ca.crt", user)))

    def wait_ready(self, timeout: float = 90) -> None:
        """Until ``/readyz`` says ok (and the discovery the clients need is served)."""
        deadline = time.monotonic() + timeout
        context = self.ssl_context()
        last: Exception | None = None
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited ({process.returncode}):\n{log}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=context, timeout=5) as r:
                    if r.read() == b"ok":
                        return
            except urllib.error.HTTPError as exc:  # not ready yet: it says why
                exc.close()
                last = exc
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready after {timeout} s: {last}")

    # ---- reading the audit log -----------------------------------------------------------

    def audit_events(self) -> Iterator[dict[str, Any]]:
        """Every audited request (ResponseComplete stage), oldest first."""
        if not self.audit_log.exists():
            return
        with self.audit_log.open() as stream:
            for line in stream:
                with contextlib.suppress(json.JSONDecodeError):
                    event = json.loads(line)
                    if event.get("stage") == "ResponseComplete":
                        yield event
