"""Helpers for the registry tests: synthetic images, and ``niximage serve`` as a process.

Import as ``tests.registry.support`` (conftest modules are not importable).
"""

from __future__ import annotations

import gzip
import io
import json
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from niximage_core import imagespec, layout, manifest, revisions, sources
from niximage_core.digest import Digest
from niximage_core.storage.base import Storage
from niximage_core.storage.filesystem import FilesystemStorage
from testsupport import env as source_env

ROOT = Path(__file__).resolve().parents[2]
SOURCE = sources.parse_source("path:/nonexistent/testpkgs#sha256-" + "A" * 43 + "=")


@dataclass(frozen=True)
class Image:
    manifest: manifest.Blob
    config: manifest.Blob
    layer: bytes
    layer_digest: Digest
    docker_manifest: manifest.Blob
    index: bytes
    index_digest: Digest
    big: Digest
    """A 5 MiB blob: bigger than any manifest may be."""


def layer_bytes() -> tuple[bytes, bytes]:
    """A tar.gz with one file, and its uncompressed tar (for the diffID)."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        data = b"hello from the registry tests\n"
        info = tarfile.TarInfo("etc/hello.txt")
        info.size, info.mtime = len(data), 1
        archive.addfile(info, io.BytesIO(data))
    return gzip.compress(tar.getvalue(), mtime=0), tar.getvalue()


def write_images(store: FilesystemStorage) -> Image:
    layer, tar = layer_bytes()
    layer_digest = store.put_blob(layer)
    descriptor = manifest.LayerDescriptor(layer_digest, Digest.of(tar), len(layer), "hello")
    images = {}
    for fmt in ("oci", "docker"):
        spec = imagespec.make_spec(["hello"], SOURCE, format=fmt)
        config = manifest.image_config(spec, [descriptor], ["sh"])
        image = manifest.image_manifest(spec, config, [descriptor])
        store.put_blob(config.data)
        store.put_blob(image.data)
        images[fmt] = (config, image)
    oci_config, oci = images["oci"]
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest.OCI_INDEX,
            "manifests": [
                {**oci.descriptor(), "platform": {"architecture": "amd64", "os": "linux"}}
            ],
        }
    ).encode()
    index_digest = store.put_blob(index)
    big = store.put_blob(b"x" * (5 * 1024 * 1024))
    # test/app once had an image with the big blob as a layer: its tag moved on, its
    # revision link stays, so the blob is still served under test/app (and only there).
    link_blob(store, "test/app", big, oci)
    tags = {
        "test/app": {"latest": oci, "docker": images["docker"][1], "index": None},
        "other/repo": {"latest": oci},
        "a/b": {"latest": oci},
        "a": {"solo": oci},
    }
    for repository, entries in tags.items():
        for tag, blob in entries.items():
            digest = blob.digest if blob is not None else index_digest
            store.write(layout.tag_path(repository, tag), str(digest).encode())
    for number in range(1, 6):
        store.write(layout.tag_path("many/tags", f"v{number}"), str(oci.digest).encode())
    return Image(
        oci, oci_config, layer, layer_digest, images["docker"][1], index, index_digest, big
    )


def link_blob(store: Storage, repository: str, blob: Digest, like: manifest.Blob) -> Digest:
    """Make ``blob`` servable under ``repository``: a manifest (``like``, with ``blob`` as
    its layer) that the repository was once tagged with, through its revision link. The
    registry serves a blob only under repositories that reach it."""
    image = json.loads(like.data)
    size = store.blob_size(blob)
    image["layers"] = [{**image["layers"][0], "digest": str(blob), "size": size}]
    digest = store.put_blob(json.dumps(image).encode())
    store.write(revisions.revision_path(repository, digest), str(digest).encode())
    return digest


class RegistryProcess:
    """``niximage serve`` as a real process on a free loopback port.

    Started through ``python -m niximage_cli serve``, the ``niximage`` command itself.
    stdout (the access log) and stderr go to files, so a chatty server never blocks on a
    full pipe.
    """

    def __init__(self, storage: Path | str, *args: str, env: dict[str, str] | None = None) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "niximage_cli",
            "serve",
            "--storage",
            str(storage),
            "--listen",
            "127.0.0.1:0",
            *args,
        ]
        self.env = {**source_env(), **(env or {})}
        self._out = tempfile.NamedTemporaryFile(prefix="registry-out-", suffix=".log")  # noqa: SIM115
        self._err = tempfile.NamedTemporaryFile(prefix="registry-err-", suffix=".log")  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout: float = 60.0) -> RegistryProcess:
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            env=self.env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr().splitlines():
                if line.startswith("{") and '"listening"' in line:
                    self.address = json.loads(line)["address"]
                    return self
            if self.process.poll() is not None:
                raise RuntimeError(f"niximage serve exited:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"niximage serve did not start:\n{self.stderr()[-3000:]}")

    def stderr(self) -> str:
        return Path(self._err.name).read_text(errors="replace")

    def access_log(self) -> list[dict[str, object]]:
        text = Path(self._out.name).read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._out.close()
        self._err.close()
