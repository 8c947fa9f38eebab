"""The build pipeline: spec → Nix closure → layers → tarballs → config → manifest → storage.

Imports the pure core, tarball/toplayer (local files), nixcli and the storage interface.
Layers are keyed by their store paths (docs/architecture.md#identity-and-caching): a layer whose
key is already recorded
in ``layers/`` (and whose blob exists) is neither packed nor uploaded again, by any builder.
Metadata is written only after the blobs it names, so a reader that finds a ``layers/``,
``builds/`` or ``tags/`` entry always finds its blobs.

Garbage collection may run at any time (``gc``'s module doc has the protocol and why it is
safe): a build holds a lease naming the blobs it relies on, touches every blob it reuses,
and after writing the manifest touches every blob again, packing anew whatever vanished.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from niximage_builder import layering, listings, nixcli, sourcing, tarball, toplayer
from niximage_builder.closure import ClosureGraph
from niximage_builder.contents import Contents, LocalStore
from niximage_builder.popularity import Popularity
from niximage_core import gc, inspection, layout, manifest, referrers
from niximage_core.digest import Digest
from niximage_core.errors import InvalidInput, NixImageError, StorageError
from niximage_core.imagespec import (
    FORMAT_VERSION,
    BuildTarget,
    ImageSpec,
    IndexSpec,
    canonical_json,
    spec_document,
)
from niximage_core.result import BuildError, BuildResult, LayerResult, PlatformResult, Referrer
from niximage_core.storage.base import Storage, check_key

Progress = Callable[[str], None]
TOP_LAYER = "<top>"
VERIFY_ROUNDS = 3
"""Passes of touching every blob of a new manifest before giving up on a racing gc."""


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


class _Packer:
    """Packs (or reuses) one layer at a time; safe to call from several threads."""

    def __init__(
        self,
        storage: Storage,
        spec: ImageSpec,
        lease: gc.Lease | None = None,
        contents: Contents | None = None,
    ) -> None:
        self.storage = storage
        self.compression = spec.compression
        self.lease = lease
        self.contents = contents or LocalStore()
        self.listing = listings.through_storage(storage, self.contents.listing)
        """The roots' trees for the top layer: from ``listings/`` when stored."""
        self.uploaded = 0
        self.shell: list[str] | None = None
        """The top layer's ``Cmd`` once ``shell_known``: recorded with the top layer, so a
        reused top layer needs no look at the roots' files."""
        self.shell_known = False
        self._lock = threading.Lock()

    def layer(self, paths: Sequence[str], nar_size: int, key_paths: Sequence[str]) -> LayerResult:
        key = check_key(f"layers/{layer_key(key_paths, self.compression)}")
        known = self._known(key)
        if known is not None:
            if paths == [TOP_LAYER] and "cmd" in known:
                self.shell, self.shell_known = known["cmd"], True  # type: ignore[assignment]
            return LayerResult(
                **_layer_fields(known), narSize=nar_size, paths=list(paths), reused=True
            )
        return self.pack(paths, nar_size, key_paths)

    def pack(self, paths: Sequence[str], nar_size: int, key_paths: Sequence[str]) -> LayerResult:
        """Pack and upload the layer, whatever ``layers/`` says."""
        key = check_key(f"layers/{layer_key(key_paths, self.compression)}")
        meta: dict[str, object] = {}
        with self.storage.blob_writer() as writer:
            if paths == [TOP_LAYER]:
                # One listing per root for both the forest and the Cmd, not a scan each.
                listing = functools.cache(self.listing)
                packed = toplayer.pack_top_layer(key_paths, writer, self.compression, None, listing)
                self.shell = toplayer.shell_command(key_paths, listing)
                meta["cmd"], self.shell_known = self.shell, True
            else:
                entries = self.contents.entries(paths)
                packed = tarball.pack_normalized(entries, writer, self.compression)
            writer.commit(packed.digest)
        if paths != [TOP_LAYER]:
            self.contents.release(paths)
        self._depend(packed.digest)
        gc.checkpoint("build.packed", digest=packed.digest)
        with self._lock:
            self.uploaded += packed.size
        meta.update(digest=str(packed.digest), diffId=str(packed.diff_id), size=packed.size)
        self.storage.write(key, json.dumps(meta, sort_keys=True).encode())
        return LayerResult(**_layer_fields(meta), narSize=nar_size, paths=list(paths), reused=False)

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
        # In the lease before we rely on it; the touch keeps gc off it for its grace period.
        self._depend(digest)
        gc.checkpoint("build.reuse", digest=digest)
        if gc.touch_blob(self.storage, digest) != meta.get("size"):
            return None  # the blob was garbage-collected or never completed: rebuild it
        cmd = meta.get("cmd", False)
        if not (cmd is None or (isinstance(cmd, list) and all(isinstance(c, str) for c in cmd))):
            meta.pop("cmd", None)  # not ours (or from before it was recorded): look again
        return meta

    def _depend(self, digest: Digest) -> None:
        if self.lease is not None:
            self.lease.add(digest)


def _layer_fields(meta: dict[str, object]) -> dict[str, object]:
    """What a ``LayerResult`` takes from a ``layers/`` record."""
    return {"digest": meta["digest"], "diffId": meta["diffId"], "size": meta["size"]}


def assemble(
    spec: ImageSpec,
    graph: ClosureGraph,
    storage: Storage,
    options: BuildOptions,
    progress: Progress | None = None,
    lease: gc.Lease | None = None,
    contents: Contents | None = None,
    meta: Sequence[Mapping[str, Any]] = (),
) -> tuple[BuildResult, dict[str, float]]:
    """Layers, tarballs, config and manifest for a realised closure, and its SBOM (from
    the closure and the requested packages' ``meta``) linked to the manifest as a referrer.

    Every blob the manifest names exists when this returns (verified after the manifest was
    written, see ``_secure``); ``lease`` collects their digests for gc.
    """
    say = progress or (lambda _message: None)
    timings: dict[str, float] = {}
    started = time.monotonic()
    planned = layering.plan_layers(graph, options.popularity, options.budget)
    timings["layering"] = time.monotonic() - started
    say(f"{len(graph.nodes)} store paths in {len(planned)} layers (+ top layer)")

    packer = _Packer(storage, spec, lease, contents)
    started = time.monotonic()
    jobs = [(list(layer.paths), layer.size, list(layer.paths)) for layer in planned]
    jobs.append(([TOP_LAYER], 0, list(graph.roots)))
    with ThreadPoolExecutor(max_workers=options.workers) as pool:
        futures = [pool.submit(packer.layer, *job) for job in jobs[:-1]]
        top = pool.submit(packer.layer, *jobs[-1])
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
    shell = packer.shell
    if not packer.shell_known:  # a top layer recorded before its Cmd was
        shell = toplayer.shell_command(graph.roots, packer.listing)
    config = manifest.image_config(spec, descriptors, shell)
    image = manifest.image_manifest(spec, config, descriptors)
    small = [config, image]
    # The same image has the same SBOM (the closure and the source decide both): an earlier
    # build's is kept, in the lease, once its blobs are touched; else it is written anew.
    about = inspection.stored_sbom(storage, image.digest)
    named = [Digest.parse(d) for d in (about.manifestDigest, *about.blobs)] if about else []
    if lease is not None:
        lease.add(*(blob.digest for blob in small), *named)
        lease.flush()  # every digest of the image, before anything names it
    artifact: list[manifest.Blob] = []
    if about is None or gc.touch_all(storage, named):
        about, artifact = _sbom(spec, graph, meta, image)
        small += artifact
        if lease is not None:
            lease.add(*(blob.digest for blob in artifact))
            lease.flush()
    put = 0
    for blob in small:
        if gc.touch_blob(storage, blob.digest) is None:
            storage.put_blob(blob.data)
            put += len(blob.data)
    gc.checkpoint("build.manifest-written", digest=image.digest)
    put += _secure(storage, packer, jobs, layers, small)
    if artifact:  # linked after its blobs, so whoever finds the link finds them
        referrers.record(storage, image.digest, manifest.referrer_descriptor(artifact[-1]))
    uploaded = packer.uploaded + put
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
        referrers=[about],
        bytesUploaded=uploaded,
    )
    return result, timings


def _sbom(
    spec: ImageSpec,
    graph: ClosureGraph,
    meta: Sequence[Mapping[str, Any]],
    image: manifest.Blob,
) -> tuple[Referrer, list[manifest.Blob]]:
    """The image's SBOM: its document, the empty config and the artifact manifest (last)."""
    # Imported here: cyclonedx takes ~0.2 s to import, and a build whose image (and so
    # SBOM) is stored already never needs it.
    from niximage_builder import sbom

    document = manifest.Blob(sbom.MEDIA_TYPE, sbom.document(spec, graph, meta, image.digest))
    artifact = manifest.artifact_manifest(sbom.MEDIA_TYPE, document, sbom.TITLE, image)
    empty = manifest.Blob(manifest.OCI_EMPTY, manifest.EMPTY_CONFIG_DATA)
    about = Referrer(
        artifactType=sbom.MEDIA_TYPE,
        manifestDigest=str(artifact.digest),
        blobs=[str(empty.digest), str(document.digest)],
    )
    return about, [empty, document, artifact]


def _secure(
    storage: Storage,
    packer: _Packer,
    jobs: Sequence[tuple[list[str], int, list[str]]],
    layers: Sequence[LayerResult],
    blobs: Sequence[manifest.Blob],
) -> int:
    """Touch every blob of the written manifest; pack or put again what a gc removed.

    Rule W3 of ``gc``: after this, no gc deletes these blobs within its grace period.
    Returns the bytes of small blobs put again (repacked layers count in ``packer``).
    """
    by_digest = {Digest.parse(layer.digest): index for index, layer in enumerate(layers)}
    small = {blob.digest: blob for blob in blobs}
    put = 0
    for _ in range(VERIFY_ROUNDS):
        missing = gc.touch_all(storage, [*by_digest, *small])
        gc.checkpoint("build.verified", missing=missing)
        if not missing:
            return put
        for digest in missing:
            if digest in small:
                storage.put_blob(small[digest].data)
                put += len(small[digest].data)
            else:
                _repack(packer, jobs[by_digest[digest]], digest)
    raise StorageError(
        "blobs of the new image keep disappearing while it is being verified: is a gc "
        "running with a grace period shorter than this build?"
    )


def _repack(packer: _Packer, job: tuple[list[str], int, list[str]], digest: Digest) -> None:
    again = packer.pack(*job)
    if again.digest != str(digest):
        raise StorageError(
            f"layer {digest} vanished and packing it again gave {again.digest}: "
            "the layer's store paths changed"
        )


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
    stored = _stored(storage, spec, options)
    if stored is not None:
        return stored
    # The lease lives until builds/<key> is written (released on any exit).
    with contextlib.ExitStack() as held:
        try:
            manifest.layer_media_type(spec)
            (progress or (lambda _m: None))(f"realising {len(spec.packages)} packages with Nix")
            obtained = held.enter_context(sourcing.obtain(spec, nix, cancel))
            lease = held.enter_context(gc.Lease(storage, f"build {key}"))
            result, timings = assemble(
                spec,
                obtained.graph,
                storage,
                options,
                progress,
                lease,
                obtained.contents,
                obtained.meta,
            )
        except NixImageError as error:
            _record_failure(storage, spec, error, started)
            raise
        timings = {**obtained.timings, **timings, "total": time.monotonic() - started}
        fetched = obtained.downloads
        result = result.model_copy(
            update={
                "timings": timings,
                "derivationsBuilt": obtained.derivations_built,
                "narsDownloaded": fetched.nars if fetched else 0,
                "narBytesDownloaded": fetched.nar_bytes if fetched else 0,
                "bytesDownloaded": fetched.file_bytes if fetched else 0,
            }
        )
        layout.record_result(storage, result)
        gc.checkpoint("build.recorded", key=key)
    return result


def _stored(storage: Storage, target: BuildTarget, options: BuildOptions) -> BuildResult | None:
    """The stored success of ``target``'s key, when the options and its source allow reuse."""
    if not (options.use_cache and target.source.pinned):
        return None
    cached = layout.cached_result(storage, target.build_key())
    if cached is None:
        return None
    return cached.model_copy(update={"cached": True, "bytesUploaded": 0})


def _record_failure(
    storage: Storage, target: BuildTarget, error: NixImageError, started: float
) -> None:
    """Record the error in ``builds/<key>`` for the operator, best effort: a storage outage
    must not hide the original error."""
    failed = BuildResult(
        buildKey=target.build_key(),
        spec=spec_document(target),
        ok=False,
        error=BuildError.from_exception(error),
        timings={"total": time.monotonic() - started},
    )
    with contextlib.suppress(NixImageError):
        layout.record_result(storage, failed)  # never over another builder's success


def build_index(
    index: IndexSpec,
    storage: Storage,
    nix: nixcli.NixSettings,
    options: BuildOptions | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> BuildResult:
    """Build (or reuse) each platform's image, then the index over them, recorded in
    ``builds/<index key>``. A platform whose ``builds/<key>`` is stored is not built again;
    the first platform that fails fails the index, recorded and raised like ``build_image``."""
    options = options or BuildOptions()
    key = index.build_key()
    started = time.monotonic()
    stored = _stored(storage, index, options)
    if stored is not None:
        return stored
    say = progress or (lambda _message: None)
    images: list[BuildResult] = []
    try:
        for spec in index.images:
            say(f"platform {spec.arch}")
            images.append(build_image(spec, storage, nix, options, progress, cancel))
        # The lease lives until builds/<key> is written, as in build_image.
        with gc.Lease(storage, f"build {key}") as lease:
            result = _write_index(index, images, storage, lease)
            timings = {"total": time.monotonic() - started}
            result = result.model_copy(update={"timings": timings})
            layout.record_result(storage, result)
            gc.checkpoint("build.recorded", key=key)
    except NixImageError as error:
        _record_failure(storage, index, error, started)
        raise
    return result


def build_target(
    target: BuildTarget,
    storage: Storage,
    nix: nixcli.NixSettings,
    options: BuildOptions | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> BuildResult:
    """``build_image`` for one platform, ``build_index`` for several."""
    if isinstance(target, IndexSpec):
        return build_index(target, storage, nix, options, progress, cancel)
    return build_image(target, storage, nix, options, progress, cancel)


def _write_index(
    index: IndexSpec, images: Sequence[BuildResult], storage: Storage, lease: gc.Lease
) -> BuildResult:
    """Put the index blob, after every blob it reaches is in the lease and touched."""
    platforms = [
        PlatformResult(
            architecture=spec.arch,
            buildKey=image.buildKey,
            manifestDigest=str(image.manifestDigest),
            configDigest=str(image.configDigest),
            imageSize=image.imageSize,
            layers=[layer.digest for layer in image.layers],
            referrers=image.referrers,
        )
        for spec, image in zip(index.images, images, strict=True)
    ]
    entries = [
        manifest.IndexEntry(
            spec.arch,
            str(image.mediaType),
            Digest.parse(str(image.manifestDigest)),
            _manifest_size(storage, Digest.parse(str(image.manifestDigest))),
        )
        for spec, image in zip(index.images, images, strict=True)
    ]
    blob = manifest.image_index(index.format, entries)
    # Every layer of every platform once, in platform order (a layer both share is one).
    layers = list({layer.digest: layer for image in images for layer in image.layers}.values())
    provisional = BuildResult(
        buildKey=index.build_key(),
        spec=spec_document(index),
        ok=True,
        manifestDigest=str(blob.digest),
        mediaType=blob.media_type,
        imageSize=sum(platform.imageSize for platform in platforms),
        layers=layers,
        platforms=platforms,
        bytesUploaded=sum(image.bytesUploaded for image in images),
    )
    named = gc.result_digests(provisional)
    lease.add(*named)
    lease.flush()
    missing = gc.touch_all(storage, named[1:])
    if missing:
        raise StorageError(
            f"blob {missing[0]} of a platform image was garbage-collected while the index "
            "was built; build it again"
        )
    if gc.touch_blob(storage, blob.digest) is None:
        storage.put_blob(blob.data)
    gc.checkpoint("build.manifest-written", digest=blob.digest)
    return provisional


def _manifest_size(storage: Storage, digest: Digest) -> int:
    size = gc.touch_blob(storage, digest)
    if size is None:
        raise StorageError(f"the manifest {digest} of a platform image is not in storage")
    return size
