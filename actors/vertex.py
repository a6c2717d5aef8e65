"""Claude on Google Vertex AI, as an Anthropic-dialect provider's upstream: the model in the path
(`rawPredict`, `streamRawPredict`, region and project in the URL), the body Vertex takes (the
Messages body without `model`, with its `anthropic_version`), and an OAuth2 access token.

google-auth does the credentials (application default credentials, or a service-account or
authorized-user file): its token requests are blocking HTTP calls, so a refresh runs in a worker
thread, one at a time, when the token is missing or within google-auth's refresh window of its
expiry (a few minutes before it ends) - never on the trio thread, never once per request.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from actors.settings import Vertex

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


def base_url(region: str) -> str:
    """The region's endpoint (the calls' paths are ProviderConfig.path_for's)."""
    if region == "global":
        return "https://aiplatform.googleapis.com"
    return f"https://{region}-aiplatform.googleapis.com"


def body(anthropic: bytes, version: str) -> bytes:
    """A Messages body as Vertex takes it: the model is in the path (`stream` stays)."""
    obj = json.loads(anthropic)
    obj.pop("model", None)
    return json.dumps({"anthropic_version": version, **obj}).encode()


class TokenSource:
    """Bearer tokens for one provider's calls, from google-auth credentials."""

    def __init__(self, settings: Vertex) -> None:
        self._file = settings.credentials_file
        self._credentials: Any = None
        self._lock = trio.Lock()
        self.refreshes = 0

    def _load(self) -> Any:
        """The credentials: from the configured file (a service account's key, or an
        authorized user's: the two kinds accepted, each with its own loader), else ADC. The
        imports are here, in the worker thread: google-auth is slow to load."""
        import google.auth

        if not self._file:
            credentials, _ = google.auth.default(scopes=SCOPES)
            return credentials
        with open(self._file) as f:
            kind = json.load(f).get("type")
        if kind == "service_account":
            from google.oauth2 import service_account

            return service_account.Credentials.from_service_account_file(self._file, scopes=SCOPES)
        if kind == "authorized_user":
            from google.oauth2 import credentials as user

            return user.Credentials.from_authorized_user_file(self._file, scopes=SCOPES)
        raise ValueError(
            f"{self._file}: a credentials file of type {kind!r}; give a service account's or an"
            " authorized user's, or leave credentials_file out to use application default"
            " credentials"
        )

    def _refresh(self) -> None:
        import urllib3
        from google.auth.transport.urllib3 import Request

        if self._credentials is None:
            self._credentials = self._load()
        self._credentials.refresh(Request(urllib3.PoolManager()))

    async def headers(self) -> list[tuple[bytes, bytes]]:
        credentials = self._credentials
        if credentials is None or not credentials.valid:
            async with self._lock:  # one refresh at a time; the others wait for its token
                credentials = self._credentials
                if credentials is None or not credentials.valid:
                    await trio.to_thread.run_sync(self._refresh)
                    self.refreshes += 1
                    credentials = self._credentials
        return [(b"authorization", f"Bearer {credentials.token}".encode())]
