"""The Anthropic Messages dialect: `POST /v1/messages` for clients, `{base_url}/v1/messages` upstream.

As with OpenAI, a same-dialect attempt sends the client's bytes with only the top-level `model`
replaced. Streams keep their `event:` lines. Errors take Anthropic's shape,
`{"type": "error", "error": {"type", "message"}, "request_id"}`, with Anthropic's error types
(529 is `overloaded_error`). An attempt on an OpenAI-dialect provider is translated both ways
(router/dialects/translate.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from actors.outcome import Failure, Kind
from actors.settings import ProviderConfig
from actors.sse import SSEEvent
from actors.wire import Usage
from router.dialects.base import ClientRequest, JSONRequest, StreamWriter
from router.dialects.jsonbody import (
    MAX_OUTPUT_TOKENS,
    bounded_int,
    content_counter,
    count_content,
    event_object,
    finite_number,
    optional,
    parse_object,
    required_model,
    string_list,
)
from router.errors import RequestError

PATH = "/v1/messages"  # under the provider's base_url: the API root, as Anthropic documents it
DEFAULT_VERSION = "2023-06-01"
_ROLES = ("user", "assistant", "system")  # system: mid-conversation, as Anthropic allows

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_INPUT = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_OUTPUT = re.compile(rb'"output_tokens"\s*:\s*(\d+)')
_CACHE_READ = re.compile(rb'"cache_read_input_tokens"\s*:\s*(\d+)')
_CACHE_WRITE = re.compile(rb'"cache_creation_input_tokens"\s*:\s*(\d+)')


def _int(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    m = pattern.search(data)
    return None if m is None else int(m.group(1))


def _usage_parts(data: bytes) -> tuple[Usage | None, int | None]:
    """(input side, output) from a body or event's usage, where given.

    Anthropic's `input_tokens` excludes cached tokens; both cache counts are added to `input`
    (and kept apart, for prices)."""
    inputs, outputs = _int(_INPUT, data), _int(_OUTPUT, data)
    side = None
    if inputs is not None:
        read, write = _int(_CACHE_READ, data) or 0, _int(_CACHE_WRITE, data) or 0
        side = Usage(inputs + read + write, 0, read, write)
    return side, outputs


@attrs.frozen
class Wire:
    """The upstream side for a provider actor: x-api-key, anthropic-version, usage's parts."""

    version: str = DEFAULT_VERSION

    @property
    def fixed_headers(self) -> Mapping[str, str]:
        return {"anthropic-version": self.version}

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        return {"x-api-key": api_key}

    def tokens(self, body: bytes) -> int | None:
        usage = self.usage(body)
        return usage.total if usage is not None else None

    def usage(self, body: bytes) -> Usage | None:
        side, outputs = _usage_parts(body)
        if side is None and outputs is None:
            return None
        return attrs.evolve(side or Usage(), output=outputs or 0)

    def stream_tally(self) -> _StreamTally:
        return _StreamTally()


class _StreamTally:
    """message_start carries the input (and a placeholder output count, not used), message_delta
    the cumulative output: the total is the start's input plus the latest message_delta's output
    (0 when none said: the face then estimates it from the content relayed). The answer is
    complete at message_stop."""

    __slots__ = ("_input", "_output", "complete")

    def __init__(self) -> None:
        self._input: Usage | None = None
        self._output: int | None = None
        self.complete = False

    @property
    def usage(self) -> Usage | None:
        if self._input is None and self._output is None:
            return None
        return attrs.evolve(self._input or Usage(), output=self._output or 0)

    def feed(self, events: Sequence[SSEEvent]) -> None:
        for event in events:
            name = event.event
            if name in (b"message_start", b"message_delta"):
                side, outputs = _usage_parts(event.data)
                self._input = side if side is not None else self._input
                if name == b"message_delta" and outputs is not None:
                    self._output = outputs
            elif name == b"message_stop" or (not name and b"message_stop" in event.data):
                self.complete = True  # (the second: an upstream that writes no event lines)


def error_type(status: int) -> str:
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, request_id: str | None = None, **extra: Any) -> bytes:
    error: dict[str, Any] = {"type": error_type(status), "message": message, **extra}
    body: dict[str, Any] = {"type": "error", "error": error}
    if request_id is not None:
        body["request_id"] = request_id
    return json.dumps(body).encode()


@attrs.frozen
class MessagesRequest(JSONRequest):
    """A validated Messages request and what the cascade needs from it."""


def _validate(obj: dict[str, Any], *, counting: bool = False) -> None:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required and must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise RequestError(
                f"'messages[{i}]' must be an object with role 'user', 'assistant' or 'system'",
                param=f"messages[{i}]",
            )
        content = message.get("content")
        if not isinstance(content, str | list):
            raise RequestError(
                f"'messages[{i}].content' must be a string or a list of content blocks",
                param=f"messages[{i}].content",
            )
    system = obj.get("system")
    if system is not None and not isinstance(system, str | list):
        raise RequestError("'system' must be a string or a list of text blocks", param="system")
    if counting:
        return
    if obj.get("max_tokens") is None:
        raise RequestError("'max_tokens' is required", param="max_tokens")
    bounded_int(obj, "max_tokens", MAX_OUTPUT_TOKENS)
    optional(obj, "stream", (bool,), "a boolean")
    string_list(obj, "stop_sequences")
    optional(obj, "tools", (list,), "a list")
    optional(obj, "tool_choice", (dict,), "an object")
    optional(obj, "metadata", (dict,), "an object")
    bounded_int(obj, "top_k", 1_000_000)
    for key in ("temperature", "top_p"):
        finite_number(obj, key)


def parse_messages_request(body: bytes) -> MessagesRequest:
    text, obj, spans = parse_object(body)
    model = required_model(obj)
    _validate(obj)
    return MessagesRequest(
        dialect="anthropic",
        text=text,
        model_span=spans["model"],
        model=model,
        stream=bool(obj.get("stream")),
        estimated_tokens=len(body) // 4 + int(obj["max_tokens"]),
        estimated_input_tokens=len(body) // 4,
        max_output_tokens=int(obj["max_tokens"]),
        obj=obj,
    )


def count_tokens(body: bytes) -> int:
    """An estimate of a request's input tokens (`/v1/messages/count_tokens`): the characters of
    its text, system prompt and tool definitions, four to a token. Not the provider's tokenizer:
    close for English prose, off for code and other languages (docs/dialects.md)."""
    _, obj, _ = parse_object(body)
    required_model(obj)
    _validate(obj, counting=True)
    parts = [obj.get("system"), obj["messages"], obj.get("tools")]
    characters = sum(len(json.dumps(p, ensure_ascii=False)) for p in parts if p is not None)
    return max(1, characters // 4)


# --- streams ------------------------------------------------------------------------------------


def frame(event: SSEEvent) -> bytes:
    """One event for the client, with its `event:` line."""
    head = b"event: " + event.event + b"\n" if event.event else b""
    lines = event.data.split(b"\n")
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def _error_event(status: int, message: str) -> bytes:
    return frame(SSEEvent(error_body(status, message), b"error"))


def check_start(events: tuple[SSEEvent, ...]) -> Failure | None:
    """Before commit: a stream that opens with an `error` event, or with no valid event, fails."""
    writer = Stream()
    data, error = writer.relay(events)
    if error is not None:
        kind = (
            Kind.RATE_LIMITED if "overloaded" in error or "rate_limit" in error else Kind.PROTOCOL
        )
        return Failure(kind, "stream_error", error)
    if not data:
        return Failure(Kind.PROTOCOL, "malformed_stream", "the stream opened with no valid event")
    return None


class Stream:
    """The client's Anthropic stream from an Anthropic upstream: events checked, relayed with
    their `event:` lines; `message_stop` is the end."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        out: list[bytes] = []
        for event in events:
            parsed = event_object(event.data)
            if parsed is None:
                continue  # malformed: never relayed
            if event.event == b"error" or parsed.get("type") == "error":
                error = parsed.get("error")
                detail = error if isinstance(error, dict) else {"message": str(error)}
                kind = str(detail.get("type", "api_error"))
                return b"".join(out), f"{kind}: {detail.get('message', 'upstream error')}"
            out.append(frame(event))
            if event.event == b"message_stop" or parsed.get("type") == "message_stop":
                self.done = True
                break
        return b"".join(out), None

    def finish(self) -> bytes:
        """Nothing: a complete Anthropic stream has relayed its own message_stop (a body that
        ends without one is a failed attempt, ended with `fail`)."""
        return b""

    def fail(self, message: str, code: str) -> bytes:
        status = 529 if code.startswith("overloaded") else 502
        return _error_event(status, f"{message} ({code})")


_CONTENT = content_counter("text", "partial_json", "thinking")  # a stream's content, in its events


class Anthropic:
    """The Anthropic Messages dialect (router/dialects/base.py `Dialect`)."""

    name = "anthropic"
    client_path = "/v1/messages"
    upstream_path = PATH
    forwarded_headers: tuple[bytes, ...] = (b"anthropic-beta",)  # never credentials
    input_at_start = True

    def parse(self, body: bytes) -> MessagesRequest:
        return parse_messages_request(body)

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
        if code is not None and code != error_type(status):
            extra = {"cascade_code": code, **extra}  # e.g. retry_exhausted, with `attempts`
        return error_body(status, message, request_id, **extra)

    def stream_writer(self, request: ClientRequest) -> StreamWriter:
        return Stream()

    def answered(self, request: ClientRequest, body: bytes) -> None:
        pass  # relayed as it is, nothing kept

    def content_chars(self, events: Sequence[SSEEvent]) -> int:
        return count_content(_CONTENT, events)

    def check_start(self, events: tuple[SSEEvent, ...]) -> Failure | None:
        return check_start(events)

    def wire(self, provider: ProviderConfig) -> Wire:
        return Wire(provider.anthropic_version)


DIALECT = Anthropic()
