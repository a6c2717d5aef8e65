"""The errors Cascade's request path raises, and what each becomes for the client.

    Exception
    ├── RequestError        the client's request is wrong (or cannot be served as asked): a 4xx
    │                       in the client dialect's error shape; it never reaches a provider
    ├── CascadeError        (router/cascade/dispatcher.py) the cascade ended without a success:
    │                       the provider's own 4xx, or 429/502/504 `retry_exhausted` with attempts
    └── ConfigError         (router/config/) a config is invalid: every problem, with its path

Failures of single upstream attempts are values (actors/outcome.py `Failure`), never exceptions.
"""

from __future__ import annotations


class RequestError(Exception):
    """The client's request is wrong; answered in the dialect's error shape, never sent upstream."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers  # extra answer headers (Retry-After, x-ratelimit-*)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type
