"""What an upstream answer means: the failure table of docs/failure-semantics.md as one pure classifier.

Failures are values (`Failure`), never exceptions, once they leave the actor's attempt task.
"""

from __future__ import annotations

import enum

import attrs


class Kind(enum.Enum):
    RATE_LIMITED = "rate_limited"  # 429, 529, 401/403 saying rate_limit: block target, fail over
    TRANSIENT = "transient"  # 5xx, reset, connect error/timeout: retry with backoff, then fail over
    SLOW = "slow"  # no first byte in time, stream stalled: fail over
    CONTEXT_OVERFLOW = "context_overflow"  # 400 context_length_exceeded: larger target or return
    AUTH = "auth"  # our key is bad: return, never retried on that provider
    CLIENT_ERROR = "client_error"  # the request is wrong: return the provider's error as it is
    PROTOCOL = "protocol"  # upstream spoke garbage (bad SSE, empty stream): fail over


_CONTEXT_MARKERS = (b"context_length_exceeded", b"prompt is too long", b"maximum context length")


def classify_status(status: int, body: bytes) -> Kind | None:
    """The kind of failure an HTTP status (with its error body) means; None for success."""
    if 200 <= status < 300:
        return None
    if status in (429, 529):
        return Kind.RATE_LIMITED
    if status in (401, 403):
        return Kind.RATE_LIMITED if b"rate_limit" in body else Kind.AUTH
    if status == 400 and any(m in body for m in _CONTEXT_MARKERS):
        return Kind.CONTEXT_OVERFLOW
    if status >= 500 or status in (408, 409):
        return Kind.TRANSIENT
    return Kind.CLIENT_ERROR


@attrs.frozen
class Failure:
    """One failed attempt, as the dispatcher and the client's `attempts` list see it."""

    kind: Kind
    error_type: str  # e.g. "http_503", "connect_timeout", "first_byte_timeout", "stream_cut"
    message: str
    status: int | None = None  # upstream HTTP status, when there was one
    timeout: bool = False  # the failure was a timeout (exhaustion then answers 504)
    retry_after: float | None = None  # seconds, from the upstream's headers
    until: float | None = None  # when the target's block ends (trio time), set by the actor

    @classmethod
    def from_status(cls, status: int, body: bytes, retry_after: float | None = None) -> Failure:
        kind = classify_status(status, body)
        assert kind is not None, "a 2xx is not a failure"
        return cls(
            kind, f"http_{status}", f"upstream answered {status}", status, False, retry_after
        )


# A stream whose body ended, cleanly, before its dialect's end of answer (see actors/wire.py
# `StreamTally.complete`): treated as a cut, never presented as a complete answer.
INCOMPLETE_STREAM = Failure(
    Kind.TRANSIENT,
    "stream_incomplete",
    "the upstream ended its stream before the answer was complete",
)
