"""A bearer token that is read from its file again when the file changes.

Kubernetes projects a service account's token into the pod and replaces the file before the
token expires (an hour, or the ``expirationSeconds`` of the projection); a client that read
it once at start fails every call after that on clusters that do not extend token lifetimes.
pykube-ng reads it once. The operator's and the registry's pykube sessions (their only
clients of the API besides kopf, which logs in again by itself on a 401) authenticate
through ``TokenFileAuth`` instead: the file is looked at (one ``stat``) at most once a
second and read again whenever it changed.

Imports requests only; the Kubernetes adapters decide which file (``token_file``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import requests
import requests.auth

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
RECHECK = 1.0
"""Seconds between looks at the file."""


class TokenFileAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <the file's current token>`` on every request."""

    def __init__(self, path: str, recheck: float = RECHECK) -> None:
        self.path = path
        self.recheck = recheck
        self._lock = threading.Lock()
        self._token = ""
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        return request

    def token(self) -> str:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.recheck:
                self._checked = now
                self._reload()
            return self._token

    def _reload(self) -> None:
        try:
            found = os.stat(self.path)
        except OSError:
            return  # mid-rotation (the kubelet swaps a symlink): keep the last token
        stamp = (found.st_ino, found.st_mtime_ns, found.st_size)
        if stamp == self._stamp:
            return
        try:
            with open(self.path) as stream:
                token = stream.read().strip()
        except OSError:
            return
        if token:
            self._token, self._stamp = token, stamp


def token_file(user: Mapping[str, Any], from_service_account: bool) -> str | None:
    """The file a kubeconfig user's token lives in: ``tokenFile``, or the projected service
    account token when the configuration came from the pod; None for other credentials."""
    path = user.get("tokenFile")
    if isinstance(path, str) and path:
        return path
    if from_service_account and os.path.exists(SERVICE_ACCOUNT_TOKEN):
        return SERVICE_ACCOUNT_TOKEN
    return None
