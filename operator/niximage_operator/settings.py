"""The operator's configuration: environment variables (``NIXIMAGE_OPERATOR_*``) and flags.

Pure; imports only niximage_core's units and errors (durations). Read once, when the
operator starts, and passed down explicitly (in kopf's memo), never read at import time: a
decorator argument is import time, and a value read there would ignore the environment
set later (in tests, or by a wrapper script).
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from niximage_core import imagespec
from niximage_core.errors import InvalidInput
from niximage_core.units import parse_duration

ENV_PREFIX = "NIXIMAGE_OPERATOR_"
_CACHE_URL = re.compile(r"(https?://[^/\s?#@]+|file://)(/[^\s?#]*)?")
_PUBLIC_KEY = re.compile(r"[A-Za-z0-9+\-._]{1,128}:[A-Za-z0-9+/]{43}=")
"""What ``nix-store --generate-binary-cache-key`` writes: a name and 32 bytes of base64."""

DEFAULT_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "1", "memory": "1Gi"},
    "limits": {"memory": "4Gi"},
}


class OperatorSettings(BaseSettings):
    """Everything the operator needs to know about its cluster and its builders."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    storage: str
    """Storage URL shared with the builders and the registry: ``gs://bucket[/prefix]`` or a
    directory every builder pod and the operator see at the same path."""
    registry: str
    """Registry host (and port) in image references: ``<registry>/<namespace>/<name>:<tag>``."""
    default_package_source: str
    """Package source of a NixImage without ``spec.packageSource``, in the builder's text
    form. A ``path:`` source must be pinned (``path:/dir#sha256-…``): the operator never
    runs Nix, and its build key must equal the builder's."""
    package_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """More pinned ``path:`` sources the builder image holds (comma-separated in the
    environment); a NixImage may name them by path."""
    allowed_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Package sources NixImages may ask for (comma-separated rules of ``sourcepolicy``:
    ``nixpkgs:{commit}``, ``git:https://git.example/*#{commit}``, ``nixpkgs:nixos-24.05``);
    the default source and ``package_sources`` always. Empty: nixpkgs commits only."""

    builder_image: str
    """The image builder pods run: the operator's own image, which has ``niximage`` and Nix."""
    builder_command: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["niximage"])
    builder_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    builder_resources: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    """A container ``resources`` stanza (JSON in the environment)."""
    builder_service_account: str | None = None
    """Service account of builder pods (in each NixImage's namespace), e.g. for GCS access."""
    builder_env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables of the builder container (JSON in the environment)."""
    nix_store_volume: dict[str, Any] | None = None
    """A Kubernetes volume source for the Nix store (JSON), e.g.
    ``{"persistentVolumeClaim": {"claimName": "nix-store"}}``; without it each build starts
    from an empty store."""
    nix_store_mount_path: str = "/nix"
    builder_volumes: list[dict[str, Any]] = Field(default_factory=list)
    """More volumes of builder pods (JSON list of Kubernetes ``Volume`` objects), e.g. the
    storage's PersistentVolumeClaim or a Secret with a GCS key."""
    builder_volume_mounts: list[dict[str, Any]] = Field(default_factory=list)
    """Where the builder container mounts them (JSON list of ``VolumeMount`` objects)."""
    builder_node_selector: dict[str, str] = Field(default_factory=dict)
    """More node labels builder pods need (JSON); the NixImage's architecture is added."""
    multi_arch_builder_arch: imagespec.Arch = "amd64"
    """The node architecture of the one builder pod that builds an image of several
    architectures: its Nix must build the others too (``extra-platforms`` with qemu-user's
    binfmt_misc handler on the node, or substitution from a binary cache)."""
    builder_tolerations: list[dict[str, Any]] = Field(default_factory=list)
    """Tolerations of builder pods (JSON list), e.g. for dedicated build nodes."""
    builder_image_pull_secrets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Secrets (comma-separated names, in each NixImage's namespace) to pull the builder
    image with."""
    builder_user: int = Field(default=65532, ge=1)
    """uid and gid builder pods run as (the image's unprivileged user); never root."""

    substituters: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Binary caches builder pods take store paths from (http(s):// or file:// URLs,
    comma-separated in the environment), and no others. Empty: the builder image's Nix
    configuration decides (cache.nixos.org by default)."""
    trusted_public_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """``name:base64`` keys (comma-separated) a cache's paths must be signed with."""
    netrc_secret: str | None = None
    """A Secret (key ``netrc``) with the caches' credentials, in the namespace of each
    builder pod; mounted read-only, as Nix's ``netrc-file``."""

    max_concurrent_builds: int = Field(default=4, ge=1)
    """Builder pods that may run at once, cluster-wide; the rest wait (BuilderPending)."""
    build_timeout: float = Field(default=3600.0, gt=0)
    """Seconds a build may take (Nix's limit; the pod's deadline adds a margin for upload)."""
    max_attempts: int = Field(default=5, ge=1)
    """Builder pods tried per build key before a transient failure becomes final."""
    retry_delay: float = Field(default=10.0, gt=0)
    """Seconds before the second attempt; doubled per attempt up to ``retry_max_delay``."""
    retry_max_delay: float = Field(default=600.0, gt=0)
    queue_recheck: float = Field(default=15.0, gt=0)
    """Seconds between checks for a free build slot while a build waits."""
    storage_retry_delay: float = Field(default=15.0, gt=0)
    """First delay before retrying after the operator itself could not use storage."""

    gc_interval: float | None = Field(default=None, gt=0)
    """Run garbage collection this often (seconds, or a duration such as ``24h``); unset:
    never (the default: ``niximage gc`` is then run by hand or by a CronJob)."""
    gc_grace: float = Field(default=3600.0, gt=0)
    """gc's grace period: unreferenced blobs younger than this stay."""

    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Namespaces to watch (comma-separated); empty means the whole cluster."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of the Prometheus metrics (``http://<pod>:<port>/metrics``); unset: none."""
    liveness: str | None = None
    """kopf's liveness endpoint, e.g. ``http://0.0.0.0:8080/healthz``."""
    watch_timeout: int = Field(default=300, gt=0)
    """Server-side timeout of one watch request, whole seconds (the API server refuses
    ``timeoutSeconds=300.0``); kopf reconnects from the last version."""
    sweep_interval: float = Field(default=600.0, gt=0)
    """Seconds between sweeps for tags of NixImages deleted while no operator watched (the
    first runs at start)."""

    follow_min_interval: float = Field(default=60.0, gt=0)
    """The shortest ``spec.follow.interval`` accepted (seconds, or a duration): each check
    is one ``git ls-remote`` and a status write per NixImage."""
    nixpkgs_git: str = "https://github.com/NixOS/nixpkgs.git"
    """Where a followed ``nixpkgs:<channel>`` is resolved (the channel is its branch); a
    mirror with the same branches for clusters without GitHub."""
    git_timeout: float = Field(default=30.0, gt=0)
    """Seconds one ``git ls-remote`` may take."""

    pull_secrets: bool = False
    """Keep a pull Secret (``niximage-pull``) in every namespace that has NixImages, for a
    registry that checks service account tokens (``niximage serve --auth-kubernetes``);
    its name goes into each NixImage's ``status.pullSecret``."""
    puller_cluster_role: str = "niximage-puller"
    """The ClusterRole (``get`` NixImages) that each namespace's puller service account is
    bound to, in its namespace only."""
    pull_token_seconds: int = Field(default=86400, ge=600)
    """Lifetime of the pull Secrets' tokens; each is renewed when half of it has passed."""

    @field_validator(
        "package_sources", "allowed_sources", "builder_command", "builder_image_pull_secrets",
        "namespaces",
        "substituters", "trusted_public_keys", mode="before",
    )  # fmt: skip
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # Environment variables hold "a,b"; flags and code pass lists.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("gc_interval", "gc_grace", "follow_min_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return None  # an empty variable: unset
            try:
                return parse_duration(value)
            except InvalidInput as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("builder_volume_mounts")
    @classmethod
    def _mounts(cls, value: list[dict[str, Any]], info: Any) -> list[dict[str, Any]]:
        names = {volume.get("name") for volume in info.data.get("builder_volumes", [])}
        for mount in value:
            if mount.get("name") not in names or not mount.get("mountPath"):
                raise ValueError(
                    f"mount {mount!r} needs a mountPath and the name of one of builder_volumes"
                )
        return value

    @field_validator("builder_command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("builder_command must name the niximage program")
        return value

    @field_validator("substituters")
    @classmethod
    def _substituters(cls, value: list[str]) -> list[str]:
        for url in value:
            if not _CACHE_URL.fullmatch(url):
                raise ValueError(f"substituter {url[:200]!r} is not an http(s):// or file:// URL")
        return value

    @field_validator("trusted_public_keys")
    @classmethod
    def _keys(cls, value: list[str], info: Any) -> list[str]:
        for key in value:
            if not _PUBLIC_KEY.fullmatch(key):
                raise ValueError(
                    f"trusted public key {key[:80]!r} is not 'name:base64 of 32 bytes'"
                )
        if info.data.get("substituters") and not value:
            raise ValueError("substituters need trusted_public_keys: paths are taken only signed")
        return value

    def retry_backoff(self, failed_attempts: int, seed: str = "") -> float:
        """Seconds to wait after ``failed_attempts`` failures: doubling, capped; with a
        ``seed`` (the build key), up to 20 % less, the same for the same seed and attempt,
        so builds that failed together (a node went away) do not retry in step, and a
        restarted operator waits as long as the one before."""
        exponent = max(0, failed_attempts - 1)
        delay = min(self.retry_max_delay, self.retry_delay * 2.0**exponent)
        return delay * _jitter(seed, failed_attempts) if seed else delay

    def storage_backoff(self, retries: int, seed: str = "") -> float:
        """Seconds to wait after the operator's ``retries``-th failed storage access
        (jittered like ``retry_backoff`` with a ``seed``)."""
        delay = min(self.retry_max_delay, self.storage_retry_delay * 2.0 ** min(retries, 16))
        return delay * _jitter(seed, retries) if seed else delay


def _jitter(seed: str, attempt: int) -> float:
    """A factor in [0.8, 1.0], fixed by ``seed`` and ``attempt``."""
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    return 0.8 + 0.2 * int.from_bytes(digest[:4], "big") / 0xFFFFFFFF
