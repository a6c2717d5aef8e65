"""What a dialect is, for the face and the cascade: the protocol every dialect module implements.

A dialect is one API shape (OpenAI chat completions, Anthropic messages). Its client side
parses requests and writes answers, errors and streams in that shape; its upstream side knows the
request path under a provider's base URL, how an upstream stream's first events are judged, and
what a provider actor needs (`wire`). The face maps a path to a dialect; the pipeline builds each
target's call (router/dialects/bodies.py), whatever dialect the target's provider speaks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs

from actors.outcome import Failure
from actors.settings import ProviderConfig
from actors.sse import SSEEvent
from actors.wire import UpstreamWire
from router.dialects.jsonbody import swap


@attrs.frozen
class UpstreamCall:
    """What to send one target: the path under its base URL, the body, and (for a stream) the
    judge of its first events."""

    path: str
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    check_start: Callable[[tuple[SSEEvent, ...]], Failure | None] | None = None


@attrs.frozen
class JSONRequest:
    """What every dialect's parsed request holds: the client's text (for the byte-exact swap of
    `model`), the parsed object (for translation), and what the cascade reads."""

    dialect: str  # the client's dialect, by name
    text: str
    model_span: tuple[int, int]
    model: str
    stream: bool
    estimated_tokens: int  # input (characters / 4) + max_tokens: what rpm/tpm limits count
    obj: dict[str, Any] = attrs.field(eq=False, repr=False)
    estimated_input_tokens: int = 0
    max_output_tokens: int | None = None  # the request's max_tokens, if it says

    def body_for(self, model: str) -> bytes:
        """The client's body with only the model value replaced."""
        return swap(self.text, self.model_span, model)

    def call_for(self, upstream: Dialect, model: str) -> UpstreamCall:
        """The call to a provider of the client's own dialect: the client's bytes, `model`
        replaced (another dialect's goes through its translator: router/dialects/pairs.py)."""
        return upstream_call(upstream, self.body_for(model), self.stream)

    def asking_usage(self) -> ClientRequest:
        """This request, made to get the stream's usage from an upstream of its own dialect
        (when the dialect needs asking) without showing the client what it did not ask for."""
        return self


def upstream_call(upstream: Dialect, body: bytes, stream: bool) -> UpstreamCall:
    """`body` to a provider of `upstream`'s dialect (a stream judged by its first events)."""
    return UpstreamCall(
        upstream.upstream_path, body, check_start=upstream.check_start if stream else None
    )


class ClientRequest(Protocol):
    """A parsed, validated client request."""

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool: ...

    @property
    def estimated_tokens(self) -> int: ...

    @property
    def estimated_input_tokens(self) -> int: ...

    @property
    def max_output_tokens(self) -> int | None: ...

    def asking_usage(self) -> ClientRequest: ...

    @property
    def obj(self) -> dict[str, Any]:
        """The parsed body (what a translation reads)."""

    def call_for(self, upstream: Dialect, model: str) -> UpstreamCall:
        """The call to a provider of the client's own dialect, asking it for `model`: the
        client's bytes with only `model` replaced."""


class StreamWriter(Protocol):
    """Writes the client's stream from an upstream's events (translating them if need be)."""

    @property
    def done(self) -> bool:
        """The upstream has said its stream is complete."""

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        """Client bytes for these upstream events, and the upstream's in-band error message when
        one arrived (the stream then ends with `fail`)."""

    def finish(self) -> bytes:
        """The end of a complete stream (e.g. `data: [DONE]`)."""

    def fail(self, message: str, code: str) -> bytes:
        """The in-band error that ends a stream which failed after it began."""


class Dialect(Protocol):
    name: str
    client_path: str  # the endpoint clients of this dialect call, e.g. /v1/chat/completions
    upstream_path: str  # under a provider's base_url
    # Client headers passed on to providers of the same dialect (never credentials).
    forwarded_headers: tuple[bytes, ...]
    # Upstream side: a stream reports its input tokens at its start (Anthropic's message_start),
    # so an attempt that ends early has them billed by its actor
    input_at_start: bool

    def parse(self, body: bytes) -> ClientRequest: ...

    def error_body(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None = None,
        param: str | None = None,
        *,
        request_id: str | None = None,
        **extra: Any,
    ) -> bytes:
        """An error in this dialect's shape. `type` and `code` are Cascade's (OpenAI's names);
        a dialect with other names maps them, by `status` where it must."""

    def stream_writer(self, request: ClientRequest) -> StreamWriter:
        """The client's stream from a provider of this same dialect (another dialect's stream
        is written by its translator: router/dialects/pairs.py)."""

    def answered(self, request: ClientRequest, body: bytes) -> None:
        """A whole answer from a provider of this same dialect, relayed as it is: a dialect
        that keeps something of it (the Responses API: the response, to store) reads it here."""

    def check_start(self, events: tuple[SSEEvent, ...]) -> Failure | None:
        """Upstream side: a stream that opens with an error event or garbage is a failure."""

    def content_chars(self, events: Sequence[SSEEvent]) -> int:
        """Upstream side: how much content (text, tool arguments, thinking) these events carry,
        in characters of their JSON strings: what a stream that ends without its usage is
        charged for (characters / 4)."""

    def wire(self, provider: ProviderConfig) -> UpstreamWire: ...
