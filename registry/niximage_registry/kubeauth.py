"""Pull authorisation the Kubernetes way: TokenReview, then SubjectAccessReview.

The anchor is OpenShift's integrated registry. A pull's password (or bearer token) may be
a Kubernetes service account token. The registry asks the API server who it is
(``TokenReview``, with the API server's own audiences: a pod's projected token works as it
is) and whether that identity may ``get`` NixImages in the image's namespace
(``SubjectAccessReview``). The image ``<namespace>/<name>`` belongs to the NixImage of that
name, so the rule is the one a tenant already understands: who may read the NixImage may
pull its image, and a token of namespace A never pulls an image of namespace B.

The ``kubernetes`` client library does the API calls (its in-cluster configuration
re-reads the rotated service account token of the registry's own pod); this module is the
one place in the registry that imports it. Calls block, so the registry runs them in its
storage pool. Answers, positive and negative, are cached for ``ttl`` seconds (keyed by a
hash of the token, never the token itself), so a wave of pulls costs the API server one
review per token and namespace; a revoked binding takes effect within ``ttl`` plus the
lifetime of tokens already issued by ``/token``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from niximage_core.errors import InvalidInput, NixImageError

log = logging.getLogger(__name__)

GROUP = "niximage.dev"
RESOURCE = "niximages"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
"""A namespace name (RFC 1123 label): the first component of a NixImage's repository."""
REQUEST_TIMEOUT = (3.0, 5.0)
"""Connect and read timeouts of one review: a pull must fail fast, not wait for minutes."""

K = TypeVar("K")
V = TypeVar("V")


class ReviewUnavailable(NixImageError):
    """The API server did not answer a review (the pull gets 503, not a refusal)."""


@dataclass(frozen=True)
class KubeUser:
    """Who a token belongs to, as TokenReview says: what SubjectAccessReview needs."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def looks_like_token(text: str) -> bool:
    """A JWT: three base64url parts. Anything else is never sent to the API server."""
    parts = text.split(".")
    return (
        len(parts) == 3
        and 16 < len(text) <= 16384
        and all(part and part.replace("-", "").replace("_", "").isalnum() for part in parts)
        and text.isascii()
    )


def namespace_of(repository: str) -> str | None:
    """``<namespace>/<name>`` → the namespace; None for names no NixImage can have."""
    namespace, sep, name = repository.partition("/")
    if not sep or "/" in name or not _DNS_LABEL.fullmatch(namespace):
        return None
    return namespace


class _Expiring(Generic[K, V]):
    """A bounded, thread-safe map whose entries live ``ttl`` seconds."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl, self._max, self._clock = ttl, max_entries, clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> tuple[bool, V | None]:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] < self._clock():
                return False, None
            return True, item[1]

    def put(self, key: K, value: V) -> None:
        if self._ttl <= 0:
            return
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (self._clock() + self._ttl, value)
            while len(self._items) > self._max:
                self._items.popitem(last=False)


class Reviews:
    """TokenReview and SubjectAccessReview through one API client, with their answers cached.

    ``authn`` and ``authz`` are ``kubernetes.client.AuthenticationV1Api`` and
    ``AuthorizationV1Api``; ``load`` makes them from the in-cluster configuration, or
    ``$KUBECONFIG`` outside a cluster.
    """

    def __init__(
        self,
        authn: Any,
        authz: Any,
        ttl: float = 10.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        self._client = client
        self._authn, self._authz = authn, authz
        self._users: _Expiring[bytes, KubeUser | None] = _Expiring(ttl, max_entries, clock)
        self._decisions: _Expiring[tuple[bytes, str], bool] = _Expiring(ttl, max_entries, clock)

    @classmethod
    def load(cls, ttl: float = 10.0) -> Reviews:
        from kubernetes import config

        try:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        except (config.ConfigException, OSError, TypeError, ValueError) as exc:
            raise InvalidInput(
                f"--auth-kubernetes: no in-cluster configuration and no usable kubeconfig ({exc})"
            ) from exc
        from kubernetes import client

        api = client.ApiClient()
        return cls(client.AuthenticationV1Api(api), client.AuthorizationV1Api(api), ttl)

    def user(self, token: str) -> KubeUser | None:
        """The identity of a token the API server accepts, else None."""
        key = hashlib.sha256(token.encode()).digest()
        hit, user = self._users.get(key)
        if hit:
            return user
        review = self._client.V1TokenReview(spec=self._client.V1TokenReviewSpec(token=token))
        status = self._call(self._authn.create_token_review, review).status
        user = None
        if status is not None and status.authenticated and status.user is not None:
            found = status.user
            user = KubeUser(
                username=found.username or "",
                uid=found.uid or "",
                groups=tuple(found.groups or ()),
                extra={k: tuple(v) for k, v in (found.extra or {}).items()},
            )
        self._users.put(key, user)
        return user

    def may_pull(self, user: KubeUser, namespace: str) -> bool:
        """Whether ``user`` may ``get`` NixImages in ``namespace``."""
        key = (hashlib.sha256(f"{user.username}\0{user.uid}".encode()).digest(), namespace)
        hit, allowed = self._decisions.get(key)
        if hit:
            return bool(allowed)
        spec = self._client.V1SubjectAccessReviewSpec(
            user=user.username,
            uid=user.uid or None,
            groups=list(user.groups),
            extra={k: list(v) for k, v in user.extra.items()},
            resource_attributes=self._client.V1ResourceAttributes(
                namespace=namespace, verb="get", group=GROUP, resource=RESOURCE
            ),
        )
        review = self._client.V1SubjectAccessReview(spec=spec)
        status = self._call(self._authz.create_subject_access_review, review).status
        allowed = bool(status is not None and status.allowed and not status.denied)
        self._decisions.put(key, allowed)
        return allowed

    def allowed_namespaces(self, user: KubeUser, namespaces: Sequence[str]) -> set[str]:
        return {namespace for namespace in set(namespaces) if self.may_pull(user, namespace)}

    def _call(self, create: Callable[..., Any], body: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return create(body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            # 403: the registry's own identity lacks system:auth-delegator; 5xx: an outage.
            log.error("review refused by the API server: %s %s", exc.status, exc.reason)
            raise ReviewUnavailable(f"the API server refused a review ({exc.status})") from exc
        except (HTTPError, OSError) as exc:
            log.error("review failed: %s", exc)
            raise ReviewUnavailable("the API server is unreachable") from exc
