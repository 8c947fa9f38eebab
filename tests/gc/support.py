"""Helpers for the gc tests: synthetic images, a fake Nix, closure checks.

Import as ``tests.gc.support``. The fake Nix turns package names into directories that look
like store paths (each root alone, 200 kB declared so it gets a layer of its own), so the real
build pipeline (``build.build_image``: lease, layers, manifest, verify) runs in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from niximage_builder import build, closure, nixcli
from niximage_core import imagespec, layout, manifest
from niximage_core.digest import Digest
from niximage_core.errors import NotFound
from niximage_core.result import BuildResult, LayerResult
from niximage_core.sources import PathSource
from niximage_core.storage.base import Storage


def blob_bytes(seed: str, size: int = 3000) -> bytes:
    """Incompressible-ish bytes that differ per seed."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@dataclass(frozen=True)
class Image:
    manifest: Digest
    config: Digest
    layers: tuple[Digest, ...]
    sizes: Mapping[Digest, int]

    @property
    def digests(self) -> set[Digest]:
        return {self.manifest, self.config, *self.layers}


def put_image(
    storage: Storage,
    layer_seeds: Iterable[str],
    tag: tuple[str, str] | None = None,
    build_key: str | None = None,
    layer_entries: bool = True,
) -> Image:
    """Store an image (layers, config, manifest) like a build would, with the metadata asked."""
    layers, sizes = [], {}
    for seed in layer_seeds:
        data = blob_bytes(seed)
        digest = storage.put_blob(data)
        layers.append(digest)
        sizes[digest] = len(data)
        if layer_entries:
            meta = {"digest": str(digest), "diffId": str(digest), "size": len(data)}
            storage.write(f"layers/{_hex(seed)}", json.dumps(meta).encode())
    config_data = json.dumps({"rootfs": {"diff_ids": [str(d) for d in layers]}}).encode()
    config = storage.put_blob(config_data)
    sizes[config] = len(config_data)
    doc = {
        "schemaVersion": 2,
        "mediaType": manifest.OCI_MANIFEST,
        "config": {"mediaType": manifest.OCI_CONFIG, "digest": str(config), "size": 1},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": str(d)}
            for d in layers
        ],
    }
    manifest_data = imagespec.canonical_json(doc)
    digest = storage.put_blob(manifest_data)
    sizes[digest] = len(manifest_data)
    image = Image(digest, config, tuple(layers), sizes)
    if build_key is not None:
        storage.write(f"builds/{build_key}", result_for(image, build_key).to_json())
    if tag is not None:
        storage.write(layout.tag_path(*tag), str(digest).encode())
    return image


def put_index(storage: Storage, manifests: Iterable[Digest]) -> Digest:
    doc = {
        "schemaVersion": 2,
        "mediaType": manifest.OCI_INDEX,
        "manifests": [{"mediaType": manifest.OCI_MANIFEST, "digest": str(d)} for d in manifests],
    }
    return storage.put_blob(imagespec.canonical_json(doc))


def result_for(image: Image, key: str) -> BuildResult:
    return BuildResult(
        buildKey=key,
        spec={},
        ok=True,
        manifestDigest=str(image.manifest),
        configDigest=str(image.config),
        layers=[
            LayerResult(
                digest=str(d), diffId=str(d), size=image.sizes[d], narSize=0, paths=[], reused=False
            )
            for d in image.layers
        ],
    )


def _hex(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def missing_blobs(storage: Storage, manifest_digest: Digest) -> list[Digest]:
    """Blobs of the image's closure (manifest, config, layers) that do not exist."""
    try:
        with storage.open_blob(manifest_digest) as stream:
            doc = json.loads(stream.read())
    except NotFound:
        return [manifest_digest]
    named = [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]
    return [Digest.parse(d) for d in named if storage.blob_size(Digest.parse(d)) is None]


def result_blobs(result: BuildResult) -> set[Digest]:
    """The image's blobs and its SBOM's (manifest, empty config, document)."""
    named = [result.manifestDigest, result.configDigest, *(lay.digest for lay in result.layers)]
    named += [d for ref in result.referrers for d in (ref.manifestDigest, *ref.blobs)]
    return {Digest.parse(d) for d in named if d}


class FakeNix:
    """``nixcli.realise`` without Nix: each package is a directory standing for a store path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls = 0
        self._lock = threading.Lock()

    def path(self, name: str) -> str:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        path = self.root / f"{digest}-{name}"
        with self._lock:
            if not path.exists():
                (path / "bin").mkdir(parents=True)
                (path / "bin" / name).write_bytes(blob_bytes(name, 4000))
        return str(path)

    def realise(
        self, spec: imagespec.ImageSpec, settings: Any, cancel: Any = None
    ) -> nixcli.Realised:
        self.calls += 1
        roots = tuple(sorted(self.path(name) for name in spec.packages))
        nodes = {p: closure.StorePath(p, (), 200_000) for p in roots}
        return nixcli.Realised(roots, closure.ClosureGraph(roots, nodes), {"nixBuild": 0.0})

    def spec(self, *packages: str) -> imagespec.ImageSpec:
        return imagespec.make_spec(list(packages), PathSource(path=str(self.root)))


def build_image(storage: Storage, nix: FakeNix, *packages: str, workers: int = 1) -> BuildResult:
    """The real pipeline on fake store paths (``nixcli.realise`` is patched by the fixture).

    One worker packs the layers in order, so a gate at a checkpoint stops the whole build.
    """
    options = build.BuildOptions(use_cache=False, workers=workers)
    return build.build_image(nix.spec(*packages), storage, nixcli.NixSettings(), options)


class Gate:
    """Pause a thread at one checkpoint until the test says go (deterministic orderings)."""

    def __init__(self, name: str, when: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        self.name = name
        self.when = when or (lambda _info: True)
        self.reached = threading.Event()
        self.go = threading.Event()
        self.info: Mapping[str, Any] = {}
        self.armed = True

    def __call__(self, name: str, info: Mapping[str, Any]) -> None:
        if self.armed and name == self.name and self.when(info):
            self.armed = False  # once
            self.info = info
            self.reached.set()
            if not self.go.wait(30):
                raise TimeoutError(f"gate {self.name} was never opened")

    def wait(self, timeout: float = 30) -> None:
        if not self.reached.wait(timeout):
            raise TimeoutError(f"checkpoint {self.name} not reached")


class Hooks:
    """Several gates (and observers) behind ``checkpoints.CHECKPOINT``."""

    def __init__(self, *gates: Callable[[str, Mapping[str, Any]], None]) -> None:
        self.gates = list(gates)
        self.seen: list[tuple[str, Mapping[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, info: Mapping[str, Any]) -> None:
        with self._lock:
            self.seen.append((name, dict(info)))
        for gate in self.gates:
            gate(name, info)

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.seen]


class Worker(threading.Thread):
    """Run a function in a thread; ``result()`` returns its value or raises its error."""

    def __init__(self, target: Callable[[], Any], name: str = "worker") -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self._target_fn()
        except BaseException as exc:  # handed to the test thread by result()
            self._error = exc

    def result(self, timeout: float = 30) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"{self.name} did not finish")
        if self._error is not None:
            raise self._error
        return self._value
