"""Signed GET URLs for GCS objects, so that the registry can send a pull to the bucket.

Imports google-auth and google-cloud-storage. A V4 signed URL is signed in one of two ways
(cloud.google.com/storage/docs/access-control/signing-urls-with-helpers):

- credentials with a private key (a service account key file) sign locally;
- keyless credentials of a service account (GKE Workload Identity, a Compute Engine
  service account) ask the IAM Credentials API to sign (``signBlob``) as that account,
  which needs ``roles/iam.serviceAccountTokenCreator`` on itself.

Credentials that are neither (anonymous, a user's gcloud login), or an IAM refusal, mean
"cannot sign": the caller streams the object instead. A refusal is retried after
``RETRY_REFUSED`` seconds, in case the role is granted meanwhile.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from google.auth.transport import requests as auth_requests
from google.cloud import storage

log = logging.getLogger(__name__)

RETRY_REFUSED = 600.0
"""Seconds before asking the IAM Credentials API again after it refused to sign."""


class UrlSigner:
    """Signs blob URLs with one client's credentials; safe to share between threads."""

    def __init__(
        self,
        credentials: Any,
        clock: Callable[[], float] = time.monotonic,
        request: Callable[[], Any] = auth_requests.Request,
    ) -> None:
        self._credentials = credentials
        self._clock = clock
        self._request = request
        self._lock = threading.Lock()
        self._refused_until = 0.0

    @property
    def mode(self) -> str:
        """``key`` (signs locally), ``iam`` (signBlob as the service account) or ``none``."""
        if isinstance(self._credentials, auth_credentials.Signing):
            return "key"
        if hasattr(self._credentials, "service_account_email"):
            return "iam"
        return "none"

    def sign(self, blob: storage.Blob, ttl_seconds: int) -> str | None:
        """A V4 signed GET URL for ``blob``, or None when these credentials cannot sign.

        Library and HTTP errors other than an IAM refusal propagate (the caller's to wrap).
        """
        mode = self.mode
        if mode == "none" or (mode == "iam" and self._clock() < self._refused_until):
            return None
        extra = self._iam_arguments() if mode == "iam" else {}
        try:
            url = blob.generate_signed_url(
                version="v4",
                method="GET",
                expiration=datetime.timedelta(seconds=ttl_seconds),
                **extra,
            )
        except auth_exceptions.TransportError as exc:
            if mode != "iam":
                raise
            # The library raises TransportError for any non-200 answer of signBlob: most
            # often 403, the role is missing. Streaming still works; say why once.
            self._refused_until = self._clock() + RETRY_REFUSED
            log.warning(
                "cannot sign URLs as %s through the IAM Credentials API (%s): grant it "
                "roles/iam.serviceAccountTokenCreator on itself; streaming blobs instead",
                extra.get("service_account_email"),
                str(exc)[:300],
            )
            return None
        return str(url)

    def _iam_arguments(self) -> dict[str, str]:
        """The account's e-mail and a valid access token; refreshing first learns both (a
        Compute Engine credential calls itself ``default`` until then)."""
        credentials = self._credentials
        with self._lock:
            if not credentials.valid or credentials.service_account_email == "default":
                credentials.refresh(self._request())
            return {
                "service_account_email": str(credentials.service_account_email),
                "access_token": str(credentials.token),
            }
