"""Pull authentication: the distribution token flow, with HMAC-signed tokens. No aiohttp.

Off unless users are configured. Then:

1. Any ``/v2/…`` request without valid credentials gets 401 ``UNAUTHORIZED`` with
   ``WWW-Authenticate: Bearer realm="<base>/token",service="<service>"[,scope="repository:
   <name>:pull"]``, before storage is consulted, so a 401 says nothing about what exists.
2. The client asks the token endpoint (``GET /token?service=&scope=``, Basic credentials;
   or containerd's ``POST`` password grant) and gets ``token``/``access_token``, valid
   ``token_ttl`` seconds (≥ 60, as the token spec requires).
3. It retries with ``Authorization: Bearer <token>``.

A token is ``base64url(claims).base64url(HMAC-SHA256(secret, that))``: the registry is its
own token server, so a shared secret is all it takes (stdlib ``hmac``, no JWT library).
Replicas behind one Service must share the secret (``--auth-secret-file``); a random one
is made per process otherwise.

Policy: a known user may pull every repository; a Kubernetes service account token (with
``reviews``: see ``kubeauth``) may pull the repositories ``<namespace>/<name>`` of the
namespaces where it may ``get`` NixImages; anonymous clients may pull only with
``anonymous_pull``; nobody is granted push or delete (the registry cannot do them). Basic
credentials are also accepted directly on ``/v2/`` for simple clients (curl, scripts):
the flow above is what docker, containerd and containers/image use, and Basic costs no
round trip; disable with ``allow_basic=False``.

Users come from a file of ``user:password`` lines or a directory with one file per user
whose content is the password (a Kubernetes Secret mounted as a volume; the ``..data``
entries Kubernetes adds are skipped).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from niximage_core import reference
from niximage_core.errors import InvalidInput

if TYPE_CHECKING:
    from niximage_registry.kubeauth import KubeUser, Reviews

MIN_TTL = 60


@dataclass(frozen=True)
class AuthSettings:
    users: Mapping[str, str]
    """Static users and passwords (may be empty when ``reviews`` is given)."""
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    service: str = "niximage"
    realm: str | None = None
    """Token endpoint URL; None: ``<scheme>://<Host header>/token`` of each request."""
    anonymous_pull: bool = False
    token_ttl: int = 300
    allow_basic: bool = True
    failed_login_limit: int = 10
    """Failed logins one client may make within ``failed_login_window`` seconds; past that,
    its logins answer 429 until the oldest failure leaves the window."""
    failed_login_window: float = 60.0
    reviews: Reviews | None = field(default=None, compare=False)
    """Kubernetes service account tokens as passwords (TokenReview, SubjectAccessReview)."""


@dataclass(frozen=True)
class Identity:
    """Who logged in: a static user, or a Kubernetes identity whose rights are reviewed."""

    subject: str
    kube: KubeUser | None = None


@dataclass(frozen=True)
class Grant:
    subject: str
    """The user name, or "" for anonymous."""
    repositories: frozenset[str]


def load_users(path: str | Path) -> dict[str, str]:
    """Users and passwords from a ``user:password`` file or a Secret-style directory."""
    location = Path(path)
    users: dict[str, str] = {}
    if location.is_dir():
        for entry in sorted(location.iterdir()):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            users[entry.name] = entry.read_text().rstrip("\r\n")
    else:
        for number, line in enumerate(location.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise InvalidInput(f"{location}:{number}: expected user:password")
            users[user] = password
    for user, password in users.items():
        if not password:
            raise InvalidInput(f"user {user!r} in {location} has an empty password")
    if not users:
        raise InvalidInput(f"no users in {location}")
    return users


def load_secret(path: str | Path) -> bytes:
    data = Path(path).read_bytes().strip()
    if len(data) < 16:
        raise InvalidInput(f"token secret in {path} is shorter than 16 bytes")
    return data


class FailedLogins:
    """Failed logins per client in a sliding window: guessing passwords costs time.

    Bounded: at most ``max_clients`` clients are remembered (the ones seen longest ago are
    forgotten first), so a flood of addresses cannot grow memory without end.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 100_000,
    ) -> None:
        self.limit, self.window, self._clock, self._max = limit, window, clock, max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float | None:
        """Seconds this client must wait before its next login, or None."""
        failures = self._recent(client)
        if failures is None or len(failures) < self.limit:
            return None
        return max(1.0, failures[0] + self.window - self._clock())

    def failed(self, client: str) -> None:
        failures = self._recent(client) or deque()
        failures.append(self._clock())
        self._failures[client] = failures
        self._failures.move_to_end(client)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)

    def _recent(self, client: str) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        cutoff = self._clock() - self.window
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures


class Authenticator:
    """Checks credentials and tokens; issues tokens. Knows nothing of HTTP frameworks."""

    def __init__(self, settings: AuthSettings) -> None:
        if settings.token_ttl < MIN_TTL:
            raise InvalidInput(f"token lifetime must be at least {MIN_TTL} s")
        if not settings.users and settings.reviews is None and not settings.anonymous_pull:
            raise InvalidInput("authentication needs users, Kubernetes reviews or anonymous pull")
        self.settings = settings
        self.failed_logins = FailedLogins(settings.failed_login_limit, settings.failed_login_window)
        # Compare digests of passwords: equal length inputs for compare_digest.
        self._users = {
            user: hashlib.sha256(password.encode()).digest()
            for user, password in settings.users.items()
        }

    # credentials

    def check_password(self, user: str, password: str) -> bool:
        expected = self._users.get(user)
        given = hashlib.sha256(password.encode()).digest()
        if expected is None:
            hmac.compare_digest(given, given)  # same work for unknown users
            return False
        return hmac.compare_digest(expected, given)

    def basic_user(self, header: str | None) -> str | None:
        """The static user of a valid ``Authorization: Basic`` header, else None."""
        credentials = basic_credentials(header)
        if credentials is None:
            return None
        user, password = credentials
        return user if self.check_password(user, password) else None

    # tokens

    def issue(self, subject: str, repositories: Iterable[str]) -> dict[str, object]:
        now = int(time.time())
        claims = {
            "sub": subject,
            "aud": self.settings.service,
            "iat": now,
            "exp": now + self.settings.token_ttl,
            "pull": sorted(set(repositories)),
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        token = f"{payload}.{_b64(self._sign(payload))}"
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.settings.token_ttl,
            "issued_at": issued,
        }

    def verify(self, token: str) -> Grant | None:
        payload, sep, signature = token.partition(".")
        if not sep or len(token) > 16384 or not token.isascii():
            return None
        try:
            given = _unb64(signature)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(self._sign(payload), given):
            return None
        try:
            claims = json.loads(_unb64(payload), parse_constant=_no_constant)
            if type(claims["exp"]) is not int:  # never Infinity, NaN, 1e999 or true
                return None
            expired = claims["exp"] < time.time()
            wrong_service = claims["aud"] != self.settings.service
            grant = Grant(str(claims["sub"]), frozenset(claims["pull"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        return None if expired or wrong_service else grant

    def _sign(self, payload: str) -> bytes:
        return hmac.new(self.settings.secret, payload.encode(), hashlib.sha256).digest()

    # policy

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[str]:
        """Repositories to grant pull on: the pull scopes asked for, if the caller may pull.

        ``user`` is None for anonymous callers. Other actions and resource types are left
        out (the token spec: grant the intersection, not an error).
        """
        if user is None and not self.settings.anonymous_pull:
            return []
        granted = []
        for scope in scopes:
            for item in scope.split():
                resource, _, actions = item.rpartition(":")
                kind, _, name = resource.partition(":")
                if kind != "repository" or "pull" not in actions.split(","):
                    continue
                try:
                    granted.append(reference.check_repository(name))
                except InvalidInput:
                    continue
        return granted

    def allows(self, grant: Grant, repository: str | None) -> bool:
        return repository is None or repository in grant.repositories

    def challenge(self, realm: str, repository: str | None, error: str | None = None) -> str:
        parts = [f'Bearer realm="{realm}"', f'service="{self.settings.service}"']
        if repository is not None:
            parts.append(f'scope="repository:{repository}:pull"')
        if error is not None:
            parts.append(f'error="{error}"')
        return ",".join(parts)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` of an ``Authorization: Basic`` header, else None."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except ValueError:  # not base64 (non-ASCII text included), or not UTF-8 inside
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is no JSON number")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if len(text) > 16384:
        raise ValueError("too long")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
