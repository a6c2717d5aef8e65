"""The errors Cascade's request path raises, and what each becomes for the client.

    Exception
    ├── RequestError        the client's request is wrong (or cannot be served as asked): a 4xx
    │   │                   in the client dialect's error shape; it never reaches a provider
    │   └── Untranslatable  valid in the client's dialect, but a provider of another dialect
    │                       cannot take it: that target is skipped for this request; a 400 only
    │                       when no target of the route can take it
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


class Untranslatable(RequestError):
    """A valid request that one provider dialect cannot say (a field, a value, a block with no
    equivalent there). The targets of that dialect are ineligible for this request; the route's
    other targets still serve it (router/cascade/dispatcher.py)."""
