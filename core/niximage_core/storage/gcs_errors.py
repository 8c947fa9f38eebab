"""What the Google client library raises for a failed request, and the ``StorageError`` it
becomes: one message style for every GCS module.

Imports errors, requests and the Google libraries.
"""

from __future__ import annotations

from typing import NoReturn

import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage
from google.cloud.storage import exceptions as media_exceptions

from niximage_core.errors import StorageError

# Everything the client library raises for a failed request, after its own retries.
LIBRARY_ERRORS = (
    api_exceptions.GoogleAPIError,  # HTTP errors and RetryError (retry deadline exceeded)
    auth_exceptions.GoogleAuthError,  # missing or unusable credentials
    media_exceptions.InvalidResponse,  # resumable upload / download protocol errors
    media_exceptions.DataCorruption,  # checksum mismatch between client and server
    requests.RequestException,
    ConnectionError,
)


def gs(blob: storage.Blob) -> str:
    """``gs://bucket/name``, for messages."""
    return f"gs://{blob.bucket.name}/{blob.name}"


def fail(action: str, exc: BaseException) -> NoReturn:
    raise StorageError(f"GCS: {action} failed: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """The useful part of a library error (RetryError wraps the last real one)."""
    if isinstance(exc, api_exceptions.RetryError) and exc.cause is not None:
        return f"gave up retrying ({exc.message}): {exc.cause}"
    return f"{type(exc).__name__}: {exc}"
