"""Signed blob URLs with keyless credentials (GKE Workload Identity, Compute Engine): the
IAM Credentials API signs as the service account.

Google's signBlob endpoint cannot be reached here, so the one library function that calls
it (``google.cloud.storage._signing._sign_message``) is replaced by a stand-in that signs
with a local key, as signBlob would with the account's own. Everything around it is real:
the library builds the V4 URL, and the emulator serves the object at that URL.
"""

from __future__ import annotations

import base64
import binascii
import logging
import urllib.parse
import urllib.request
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from google.cloud.storage import _signing

from niximage_core.storage.base import blob_key
from niximage_core.storage.gcs_signing import RETRY_REFUSED, UrlSigner
from tests.storage.backends import make_gcs_storage
from tests.storage.gcs_emulator import GcsEmulator

pytestmark = pytest.mark.gcs

ACCOUNT = "registry@example-project.iam.gserviceaccount.com"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class KeylessCredentials(auth_credentials.Credentials):
    """What GKE Workload Identity gives a pod: an access token, no private key, and the
    account's e-mail only once refreshed (``default`` before), as Compute Engine's."""

    def __init__(self) -> None:
        super().__init__()
        self.service_account_email = "default"
        self.refreshes = 0

    def refresh(self, request: Any) -> None:
        self.refreshes += 1
        self.token = f"access-token-{self.refreshes}"
        self.service_account_email = ACCOUNT


class SignBlob:
    """Stands in for the IAM Credentials API's signBlob: signs with the account's key."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.calls: list[tuple[str, str]] = []
        self.messages: list[bytes] = []
        self.refuse = False

    def __call__(self, message: Any, access_token: str, email: str, *_: Any) -> str:
        self.calls.append((access_token, email))
        if self.refuse:
            raise auth_exceptions.TransportError(
                'Error calling the IAM signBytes API: b\'{"error": {"code": 403, '
                '"status": "PERMISSION_DENIED"}}\''
            )
        data = message.encode() if isinstance(message, str) else message
        self.messages.append(data)
        signature = self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()


@pytest.fixture
def sign_blob(monkeypatch: pytest.MonkeyPatch) -> SignBlob:
    stand_in = SignBlob()
    monkeypatch.setattr(_signing, "_sign_message", stand_in)
    return stand_in


def test_keyless_credentials_sign_through_iam_as_their_account(
    gcs_emulator: GcsEmulator, gcs_client: Any, gcs_bucket: str, sign_blob: SignBlob
) -> None:
    data = b"layer bytes " * 1000
    digest = make_gcs_storage(gcs_client, gcs_bucket, "p").put_blob(data)
    credentials = KeylessCredentials()
    client = gcs_emulator.client(credentials=credentials)
    try:
        storage = make_gcs_storage(client, gcs_bucket, "p")
        url = storage.signed_blob_url(digest, 300)
        again = storage.signed_blob_url(digest, 300)
    finally:
        client.close()
    assert url is not None and again is not None
    # One refresh learnt the account and a token; the second URL reused them.
    assert credentials.refreshes == 1
    assert sign_blob.calls == [("access-token-1", ACCOUNT)] * 2
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Goog-Credential"][0].startswith(f"{ACCOUNT}/")
    assert urllib.parse.urlsplit(url).path == f"/{gcs_bucket}/p/{blob_key(digest)}"
    # The signature in the URL is signBlob's, and it verifies with the account's key.
    signature = binascii.unhexlify(query["X-Goog-Signature"][0])
    public = sign_blob.key.public_key()
    public.verify(signature, sign_blob.messages[0], padding.PKCS1v15(), hashes.SHA256())
    with _NO_PROXY.open(url, timeout=10) as response:
        assert response.read() == data


def test_an_iam_refusal_means_streaming_and_a_later_retry(
    gcs_client: Any, gcs_bucket: str, sign_blob: SignBlob, caplog: pytest.LogCaptureFixture
) -> None:
    sign_blob.refuse = True
    now = [1000.0]
    signer = UrlSigner(KeylessCredentials(), clock=lambda: now[0], request=object)
    blob = gcs_client.bucket(gcs_bucket).blob("blobs/sha256/" + "0" * 64)
    with caplog.at_level(logging.WARNING):
        assert signer.sign(blob, 300) is None
    assert "roles/iam.serviceAccountTokenCreator" in caplog.text and ACCOUNT in caplog.text
    assert signer.sign(blob, 300) is None  # not asked again for a while
    assert len(sign_blob.calls) == 1
    now[0] += RETRY_REFUSED + 1
    sign_blob.refuse = False
    assert signer.sign(blob, 300) is not None  # the role was granted meanwhile
    assert len(sign_blob.calls) == 2


def test_which_credentials_sign_how() -> None:
    assert UrlSigner(auth_credentials.AnonymousCredentials()).mode == "none"
    assert UrlSigner(KeylessCredentials()).mode == "iam"

    class UserLogin(auth_credentials.Credentials):  # gcloud's user credentials: no account
        def refresh(self, request: Any) -> None:
            self.token = "t"

    assert UrlSigner(UserLogin()).mode == "none"
