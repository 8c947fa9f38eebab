"""Pull authorisation the Kubernetes way: TokenReview, then SubjectAccessReview.

The anchor is OpenShift's integrated registry. A pull's password (or bearer token) may be
a Kubernetes service account token. The registry asks the API server who it is
(``TokenReview``, with the API server's own audiences: a pod's projected token works as it
is) and whether that identity may ``get`` NixImages in the image's namespace
(``SubjectAccessReview``). The image ``<namespace>/<name>`` belongs to the NixImage of that
name, so the rule is the one a tenant already understands: who may read the NixImage may
pull its image, and a token of namespace A never pulls an image of namespace B.

pykube-ng does the two API calls (plain JSON POSTs, with the pod's service account or
``$KUBECONFIG``, as for the operator); this module is the one place in the registry that
imports it. Calls block, so the registry runs them in its storage pool. Answers, positive
and negative, are cached for ``ttl`` seconds (keyed by a hash of the token, never the
token itself), so a wave of pulls costs the API server one review per token and
namespace; a revoked binding takes effect within ``ttl`` plus the lifetime of tokens
already issued by ``/token``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from niximage_core import kubetoken
from niximage_core.errors import InvalidInput, NixImageError

log = logging.getLogger(__name__)

GROUP = "niximage.dev"
RESOURCE = "niximages"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
"""A namespace name (RFC 1123 label): the first component of a NixImage's repository."""
REQUEST_TIMEOUT = (3.0, 5.0)
"""Connect and read timeouts of one review: a pull must fail fast, not wait for minutes."""
TOKEN_REVIEW = ("authentication.k8s.io/v1", "tokenreviews", "TokenReview")
ACCESS_REVIEW = ("authorization.k8s.io/v1", "subjectaccessreviews", "SubjectAccessReview")

Post = Callable[[tuple[str, str, str], dict[str, Any]], dict[str, Any]]
"""Create one review (api version, resource, kind) with this spec; the answer's status.
Raises ``ReviewUnavailable`` when the API server does not answer."""

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
    """TokenReview and SubjectAccessReview through ``post``, with their answers cached.

    ``load`` makes ``post`` from the in-cluster configuration, or ``$KUBECONFIG`` outside a
    cluster; tests hand in their own.
    """

    def __init__(
        self,
        post: Post,
        ttl: float = 10.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._post = post
        self._users: _Expiring[bytes, KubeUser | None] = _Expiring(ttl, max_entries, clock)
        self._decisions: _Expiring[tuple[bytes, str], bool] = _Expiring(ttl, max_entries, clock)

    @classmethod
    def load(cls, ttl: float = 10.0) -> Reviews:
        import pykube

        try:
            config = pykube.KubeConfig.from_env()
        except (pykube.exceptions.PyKubeError, OSError, ValueError) as exc:
            raise InvalidInput(
                f"--auth-kubernetes: no in-cluster configuration and no usable kubeconfig ({exc})"
            ) from exc
        api = pykube.HTTPClient(config, timeout=REQUEST_TIMEOUT)
        path = kubetoken.token_file(config.user, from_service_account=config.filepath is None)
        if path is not None:  # a projected token is replaced before it expires: follow it
            api.session.auth = kubetoken.TokenFileAuth(path)
        return cls(_poster(api), ttl)

    def user(self, token: str) -> KubeUser | None:
        """The identity of a token the API server accepts, else None."""
        key = hashlib.sha256(token.encode()).digest()
        hit, user = self._users.get(key)
        if hit:
            return user
        status = self._post(TOKEN_REVIEW, {"token": token})
        found = status.get("user") or {}
        user = None
        if status.get("authenticated") and found.get("username"):
            user = KubeUser(
                username=str(found["username"]),
                uid=str(found.get("uid") or ""),
                groups=tuple(found.get("groups") or ()),
                extra={k: tuple(v) for k, v in (found.get("extra") or {}).items()},
            )
        self._users.put(key, user)
        return user

    def may_pull(self, user: KubeUser, namespace: str) -> bool:
        """Whether ``user`` may ``get`` NixImages in ``namespace``."""
        key = (hashlib.sha256(f"{user.username}\0{user.uid}".encode()).digest(), namespace)
        hit, allowed = self._decisions.get(key)
        if hit:
            return bool(allowed)
        spec: dict[str, Any] = {
            "user": user.username,
            "groups": list(user.groups),
            "extra": {k: list(v) for k, v in user.extra.items()},
            "resourceAttributes": {
                "namespace": namespace,
                "verb": "get",
                "group": GROUP,
                "resource": RESOURCE,
            },
        }
        if user.uid:
            spec["uid"] = user.uid
        status = self._post(ACCESS_REVIEW, spec)
        allowed = bool(status.get("allowed")) and not status.get("denied")
        self._decisions.put(key, allowed)
        return allowed

    def allowed_namespaces(self, user: KubeUser, namespaces: Sequence[str]) -> set[str]:
        return {namespace for namespace in set(namespaces) if self.may_pull(user, namespace)}


def _poster(api: Any) -> Post:
    """``Post`` over a ``pykube.HTTPClient``."""
    import requests

    def post(review: tuple[str, str, str], spec: dict[str, Any]) -> dict[str, Any]:
        version, resource, kind = review
        body = {"apiVersion": version, "kind": kind, "spec": spec}
        try:
            response = api.post(version=version, url=resource, data=json.dumps(body))
        except (requests.RequestException, OSError) as exc:
            log.error("review failed: %s", exc)
            raise ReviewUnavailable("the API server is unreachable") from exc
        if not response.ok:
            # 403: the registry's own identity lacks system:auth-delegator; 5xx: an outage.
            log.error("review refused by the API server: %s %s", response.status_code, kind)
            raise ReviewUnavailable(f"the API server refused a review ({response.status_code})")
        try:
            status = response.json().get("status") or {}
        except ValueError as exc:
            raise ReviewUnavailable("the API server answered a review with no JSON") from exc
        return status if isinstance(status, dict) else {}

    return post
