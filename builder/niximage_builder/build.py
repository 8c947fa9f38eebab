"""The build pipeline: spec → Nix closure → layers → tarballs → config → manifest → storage.

Imports the pure core, tarball/toplayer (local files), nixcli and the storage interface.
Layers are keyed by their store paths (DESIGN.md §2): a layer whose key is already recorded
in ``layers/`` (and whose blob exists) is neither packed nor uploaded again, by any builder.
Metadata is written only after the blobs it names, so a reader that finds a ``layers/``,
``builds/`` or ``tags/`` entry always finds its blobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from niximage_builder import layering, manifest, nixcli, reference, tarball, toplayer
from niximage_builder.closure import ClosureGraph
from niximage_builder.digest import Digest
from niximage_builder.errors import InvalidInput, NixImageError
from niximage_builder.imagespec import FORMAT_VERSION, ImageSpec, canonical_json
from niximage_builder.popularity import Popularity
from niximage_builder.result import BuildError, BuildResult, LayerResult
from niximage_builder.storage.base import Storage, check_key

Progress = Callable[[str], None]
TOP_LAYER = "<top>"


@dataclass(frozen=True)
class BuildOptions:
    budget: int = 94
    """Store-path layers at most; the top layer comes on top (overlay allows 125 in all)."""
    popularity: Popularity | None = None
    workers: int = max(2, os.cpu_count() or 2)
    """Layers packed at once."""
    use_cache: bool = True
    """Return a stored ``builds/<key>`` success without running Nix."""


def layer_key(paths: Sequence[str], compression: str) -> str:
    """sha256 over the sorted store paths and the tar/compression format version."""
    material = {"formatVersion": FORMAT_VERSION, "compression": compression, "paths": sorted(paths)}
    return hashlib.sha256(canonical_json(material)).hexdigest()


def build_key_path(key: str) -> str:
    return check_key(f"builds/{key}")


TAGS_DIR = "_tags"
"""Between repository and tag: no repository component can be ``_tags`` (the name grammar
starts components with a letter or digit), so ``shell`` tag ``git`` and ``shell/git`` tag
``latest`` never collide, and a key is never also a directory on the filesystem backend."""


def tag_prefix(repository: str) -> str:
    """``tags/<repository>/_tags/``: every tag of one repository is listed under it."""
    reference.check_repository(repository)
    return f"tags/{repository}/{TAGS_DIR}/"


def tag_path(repository: str, tag: str) -> str:
    reference.check_tag(tag)
    return check_key(tag_prefix(repository) + tag)


def list_tags(storage: Storage, repository: str) -> list[str]:
    """The repository's tags, sorted (the registry's ``tags/list``)."""
    prefix = tag_prefix(repository)
    return sorted(
        key[len(prefix) :] for key in storage.list(prefix) if "/" not in key[len(prefix) :]
    )


def cached_result(storage: Storage, key: str) -> BuildResult | None:
    """A stored *successful* result whose manifest blob still exists, else None."""
    raw = storage.read(build_key_path(key))
    if raw is None:
        return None
    try:
        result = BuildResult.from_json(raw)
    except ValueError:
        return None
    if not result.ok or result.manifestDigest is None:
        return None
    if storage.blob_size(Digest.parse(result.manifestDigest)) is None:
        return None
    return result


class _Packer:
    """Packs (or reuses) one layer at a time; safe to call from several threads."""

    def __init__(self, storage: Storage, spec: ImageSpec) -> None:
        self.storage = storage
        self.compression = spec.compression
        self.uploaded = 0
        self._lock = threading.Lock()

    def layer(self, paths: Sequence[str], nar_size: int, key_paths: Sequence[str]) -> LayerResult:
        key = check_key(f"layers/{layer_key(key_paths, self.compression)}")
        known = self._known(key)
        if known is not None:
            return LayerResult(**known, narSize=nar_size, paths=list(paths), reused=True)
        with self.storage.blob_writer() as writer:
            if paths == [TOP_LAYER]:
                packed = toplayer.pack_top_layer(key_paths, writer, self.compression)
            else:
                packed = tarball.pack_paths(paths, writer, self.compression)
            writer.commit(packed.digest)
        with self._lock:
            self.uploaded += packed.size
        meta = {"digest": str(packed.digest), "diffId": str(packed.diff_id), "size": packed.size}
        self.storage.write(key, json.dumps(meta, sort_keys=True).encode())
        return LayerResult(**meta, narSize=nar_size, paths=list(paths), reused=False)

    def _known(self, key: str) -> dict[str, object] | None:
        raw = self.storage.read(key)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
            digest = Digest.parse(meta["digest"])
            Digest.parse(meta["diffId"])
        except (ValueError, KeyError, TypeError, InvalidInput):
            return None
        if self.storage.blob_size(digest) != meta.get("size"):
            return None  # the blob was garbage-collected or never completed: rebuild it
        return {"digest": meta["digest"], "diffId": meta["diffId"], "size": meta["size"]}


def shell_command(roots: Sequence[str]) -> list[str] | None:
    """``Cmd``: bash when the image has it, else sh, else none (DESIGN.md §4.6)."""
    for shell in ("bash", "sh"):
        if any(os.path.exists(os.path.join(root, "bin", shell)) for root in roots):
            return [shell]
    return None


def assemble(
    spec: ImageSpec,
    graph: ClosureGraph,
    storage: Storage,
    options: BuildOptions,
    progress: Progress | None = None,
) -> tuple[BuildResult, dict[str, float]]:
    """Layers, tarballs, config and manifest for a realised closure."""
    say = progress or (lambda _message: None)
    timings: dict[str, float] = {}
    started = time.monotonic()
    planned = layering.plan_layers(graph, options.popularity, options.budget)
    timings["layering"] = time.monotonic() - started
    say(f"{len(graph.nodes)} store paths in {len(planned)} layers (+ top layer)")

    packer = _Packer(storage, spec)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=options.workers) as pool:
        futures = [
            pool.submit(packer.layer, list(layer.paths), layer.size, layer.paths)
            for layer in planned
        ]
        top = pool.submit(packer.layer, [TOP_LAYER], 0, list(graph.roots))
        layers = []
        for index, future in enumerate(futures, 1):
            layers.append(future.result())
            say(f"layer {index}/{len(futures)} {'reused' if layers[-1].reused else 'packed'}")
        layers.append(top.result())
    timings["packing"] = time.monotonic() - started

    started = time.monotonic()
    descriptors = [
        manifest.LayerDescriptor(
            Digest.parse(layer.digest),
            Digest.parse(layer.diffId),
            layer.size,
            f"{len(layer.paths)} store paths" if layer.paths != [TOP_LAYER] else "symlink forest",
        )
        for layer in layers
    ]
    config = manifest.image_config(spec, descriptors, shell_command(graph.roots))
    image = manifest.image_manifest(spec, config, descriptors)
    uploaded = packer.uploaded
    for blob in (config, image):
        if storage.blob_size(blob.digest) is None:
            storage.put_blob(blob.data)
            uploaded += len(blob.data)
    timings["manifest"] = time.monotonic() - started
    result = BuildResult(
        buildKey=spec.build_key(),
        spec=spec.model_dump(mode="json"),
        ok=True,
        manifestDigest=str(image.digest),
        mediaType=image.media_type,
        configDigest=str(config.digest),
        imageSize=len(config.data) + sum(layer.size for layer in layers),
        layers=layers,
        bytesUploaded=uploaded,
    )
    return result, timings


def build_image(
    spec: ImageSpec,
    storage: Storage,
    nix: nixcli.NixSettings,
    options: BuildOptions | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> BuildResult:
    """Build (or reuse) the image of ``spec`` and record the result in ``builds/<key>``.

    Errors are recorded too, so the operator can read them; the error is then re-raised.
    """
    options = options or BuildOptions()
    key = spec.build_key()
    started = time.monotonic()
    if options.use_cache and spec.source.pinned:
        cached = cached_result(storage, key)
        if cached is not None:
            return cached.model_copy(update={"cached": True, "bytesUploaded": 0})
    try:
        manifest.layer_media_type(spec)
        (progress or (lambda _m: None))(f"realising {len(spec.packages)} packages with Nix")
        realised = nixcli.realise(spec, nix, cancel)
        result, timings = assemble(spec, realised.graph, storage, options, progress)
    except NixImageError as error:
        failed = BuildResult(
            buildKey=key,
            spec=spec.model_dump(mode="json"),
            ok=False,
            error=BuildError.from_exception(error),
            timings={"total": time.monotonic() - started},
        )
        _record(storage, key, failed)
        raise
    timings = {**realised.timings, **timings, "total": time.monotonic() - started}
    result = result.model_copy(update={"timings": timings})
    storage.write(build_key_path(key), result.to_json())
    return result


def _record(storage: Storage, key: str, result: BuildResult) -> None:
    """Best effort: a storage outage must not hide the original error."""
    with contextlib.suppress(NixImageError):
        storage.write(build_key_path(key), result.to_json())


def record_tag(storage: Storage, repository: str, tag: str, result: BuildResult) -> None:
    """Point ``repository:tag`` at the result's manifest (after all its blobs exist)."""
    if not result.ok or result.manifestDigest is None:
        raise InvalidInput("cannot tag a failed build")
    storage.write(tag_path(repository, tag), result.manifestDigest.encode())


def read_tag(storage: Storage, repository: str, tag: str) -> Digest | None:
    raw = storage.read(tag_path(repository, tag))
    return Digest.parse(raw.decode().strip()) if raw is not None else None
