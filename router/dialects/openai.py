"""The OpenAI dialect: request validation, the byte-exact model swap, error shapes and SSE framing.

The upstream body is the client's bytes with only the top-level `model` value replaced, so key
order, whitespace and unknown fields survive (upstream prompt caches key on the exact prefix).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from actors.outcome import INCOMPLETE_STREAM, Failure, Kind
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

DONE = b"[DONE]"
PATH = "/chat/completions"  # under the provider's base_url, which ends in /v1 (OpenAI's convention)
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_CACHED_TOKENS = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')


class Wire:
    """The upstream side for a provider actor (actors/wire.py): Bearer auth, usage."""

    fixed_headers: Mapping[str, str] = {}

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def tokens(self, body: bytes) -> int | None:
        m = _TOTAL_TOKENS.search(body)
        return int(m.group(1)) if m else None

    def usage(self, body: bytes) -> Usage | None:
        """`prompt_tokens` (cached ones included, `prompt_tokens_details.cached_tokens` of them
        read from the cache) and `completion_tokens`."""
        start = body.rfind(b'"usage"')  # usage is the answer's last field: search from there
        if start < 0:
            return None
        prompt = _PROMPT_TOKENS.search(body, start)
        if prompt is None:
            return None
        completion = _COMPLETION_TOKENS.search(body, start)
        cached = _CACHED_TOKENS.search(body, start)
        return Usage(
            int(prompt.group(1)),
            int(completion.group(1)) if completion else 0,
            int(cached.group(1)) if cached else 0,
        )

    def stream_tally(self) -> _StreamTally:
        return _StreamTally(self)


_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')  # a finish_reason that is not null


class _StreamTally:
    """The usage chunk comes last but for [DONE] after it, and holds the whole usage. The answer
    is complete once a choice has its finish_reason."""

    __slots__ = ("_wire", "complete", "usage")

    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self.usage: Usage | None = None
        self.complete = False

    def feed(self, events: Sequence[SSEEvent]) -> None:
        if not self.complete:
            search = _FINISHED.search
            for event in events:  # (a loop: any() over a generator costs more, every event)
                if search(event.data):
                    self.complete = True
                    break
        for event in events[-2:]:
            if (usage := self._wire.usage(event.data)) is not None:
                self.usage = usage
                return


WIRE = Wire()


class AzureWire(Wire):
    """Azure OpenAI with a resource key: the `api-key` header (an Entra ID token goes as a
    Bearer token, as OpenAI's: `azure.auth: bearer`)."""

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        return {"api-key": api_key}


AZURE_WIRE = AzureWire()


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None, **extra: Any
) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code", ...}}."""
    error: dict[str, Any] = {"message": message, "type": type, "param": param, "code": code}
    error.update(extra)
    return json.dumps({"error": error}).encode()


@attrs.frozen
class ChatRequest(JSONRequest):
    """A validated chat completion request and what the cascade needs from it."""

    include_usage: bool = False
    # Cascade needs the stream's usage (to settle a budget): an OpenAI upstream is asked for it
    # with stream_options.include_usage, and the usage chunk is kept from a client that did not
    # ask for it.
    want_usage: bool = False

    def asking_usage(self) -> ChatRequest:
        return attrs.evolve(self, want_usage=True)

    def body_for(self, model: str) -> bytes:
        body = super().body_for(model)
        if not (self.want_usage and self.stream and not self.include_usage):
            return body
        options = self.obj.get("stream_options")
        if options is None:  # the common case: one insertion, the rest byte for byte
            brace = body.index(b"{") + 1
            return body[:brace] + b'"stream_options":{"include_usage":true},' + body[brace:]
        rebuilt = {**self.obj, "model": model, "stream_options": {**options, "include_usage": True}}
        return json.dumps(rebuilt).encode()


# Top-level fields whose type a translation relies on (deeper values are checked where read).
_TOP_LEVEL: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("tools", (list,), "a list"),
    ("tool_choice", (str, dict), "a string or an object"),
    ("stop", (str, list), "a string or a list of strings"),
    ("user", (str,), "a string"),
    ("parallel_tool_calls", (bool,), "a boolean"),
    ("metadata", (dict,), "an object"),
)


def parse_chat_request(body: bytes) -> ChatRequest:
    text, obj, spans = parse_object(body)
    model = required_model(obj)
    _check_fields(obj)
    stream = bool(obj.get("stream"))
    options = obj.get("stream_options") or {}
    if options and not stream:
        raise RequestError(
            "'stream_options' is only allowed with 'stream': true", param="stream_options"
        )
    max_output = obj.get("max_completion_tokens") or obj.get("max_tokens") or None
    return ChatRequest(
        dialect="openai",
        text=text,
        model_span=spans["model"],
        model=model,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        obj=obj,
        estimated_tokens=len(body) // 4 + (max_output or 0),
        estimated_input_tokens=len(body) // 4,
        max_output_tokens=max_output,
    )


def _check_fields(obj: dict[str, Any]) -> None:
    """The fields Cascade reads, or a translation relies on, have their documented types."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required and must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(
                f"'messages[{i}]' must be an object with a string 'role'", param=f"messages[{i}]"
            )
    optional(obj, "stream", (bool,), "a boolean")
    optional(obj, "stream_options", (dict,), "an object")
    for key, kinds, what in _TOP_LEVEL:
        optional(obj, key, kinds, what)
    if isinstance(obj.get("stop"), list):
        string_list(obj, "stop")
    for key, top in _BOUNDED:
        bounded_int(obj, key, top)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        finite_number(obj, key)


_BOUNDED = (
    ("max_tokens", MAX_OUTPUT_TOKENS),
    ("max_completion_tokens", MAX_OUTPUT_TOKENS),
    ("n", 128),
)


# --- streams ------------------------------------------------------------------------------------


def frame(events: tuple[SSEEvent, ...] | list[SSEEvent]) -> bytes:
    """SSE bytes for the client: one `data:` line per data line, a blank line after each event."""
    out = []
    for event in events:
        if event.data.find(b"\n") >= 0:  # (not `in`: see actors/sse.py, SSEDecoder.feed)
            out.append(
                b"".join(b"data: " + line + b"\n" for line in event.data.split(b"\n")) + b"\n"
            )
        else:
            out.append(b"data: " + event.data + b"\n\n")
    return b"".join(out)


DONE_FRAME = b"data: [DONE]\n\n"


def stream_error_frame(message: str, code: str) -> bytes:
    """The in-band error that ends a committed stream that failed (no [DONE] follows it)."""
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\n"


def check_start(events: tuple[SSEEvent, ...]) -> Failure | None:
    """Before commit: a stream that opens with an error event or with garbage is a failure."""
    good, error = StreamFilter().check(events)
    if error is not None:
        return Failure(Kind.PROTOCOL, "stream_error", str(error.get("message", "in-band error")))
    if not good:
        return Failure(Kind.PROTOCOL, "malformed_stream", "the stream opened with no valid event")
    return None


def finished(chunk: dict[str, Any]) -> bool:
    """A chunk in which a choice has its finish_reason: the answer is complete.

    (A loop, not any() over a generator: this runs for every relayed event, and the generator
    cost twice the time of the check itself.)"""
    choices = chunk.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                return True
    return False


@attrs.define
class StreamFilter:
    """Checks upstream events before they reach the client.

    Drops malformed events (not JSON), notices the [DONE] sentinel and in-band error events.
    An answer is complete once a choice has its finish_reason: a [DONE] before that is an error.
    """

    done: bool = False
    finished: bool = False  # a choice's finish_reason has passed
    dropped: int = 0
    hide_usage: bool = False  # drop the usage-only chunk (Cascade asked for it, not the client)

    def check(
        self, events: tuple[SSEEvent, ...], chunks: list[dict[str, Any]] | None = None
    ) -> tuple[list[SSEEvent], dict[str, Any] | None]:
        """(events to forward, the first in-band error if one arrived); with `chunks`, the
        forwarded events' parsed objects are added to it (a writer that reads them parses each
        event once)."""
        good: list[SSEEvent] = []
        for event in events:
            data = event.data
            if data == DONE:
                if not self.finished:
                    return good, {"message": INCOMPLETE_STREAM.message}
                self.done = True
                break
            parsed = event_object(data)
            if parsed is None:  # malformed: never relayed
                self.dropped += 1
                continue
            if not self.finished:
                self.finished = finished(parsed)
            if "error" in parsed:
                error = parsed["error"]
                return good, error if isinstance(error, dict) else {"message": str(error)}
            if self.hide_usage and parsed.get("usage") and not parsed.get("choices"):
                continue
            good.append(event)
            if chunks is not None:
                chunks.append(parsed)
        return good, None


class Stream:
    """The client's OpenAI stream from an OpenAI upstream: events checked, relayed as they are."""

    __slots__ = ("_filter",)

    def __init__(self, hide_usage: bool = False) -> None:
        self._filter = StreamFilter(hide_usage=hide_usage)

    @property
    def done(self) -> bool:
        return self._filter.done

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        good, error = self._filter.check(tuple(events))
        return frame(good), None if error is None else str(error.get("message", "upstream error"))

    def finish(self) -> bytes:
        return DONE_FRAME

    def fail(self, message: str, code: str) -> bytes:
        return stream_error_frame(message, code)


_CONTENT = content_counter(
    "content", "arguments", "reasoning_content"
)  # a stream's content, in its events


class OpenAI:
    """The OpenAI chat completions dialect (router/dialects/base.py `Dialect`)."""

    name = "openai"
    client_path = "/v1/chat/completions"
    upstream_path = PATH
    forwarded_headers: tuple[bytes, ...] = ()
    input_at_start = False

    def parse(self, body: bytes) -> ChatRequest:
        return parse_chat_request(body)

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
        return error_body(message, type, code, param, **extra)  # the id is in x-request-id

    def stream_writer(self, request: ClientRequest) -> StreamWriter:
        assert isinstance(request, ChatRequest)
        return Stream(hide_usage=request.want_usage and not request.include_usage)

    def answered(self, request: ClientRequest, body: bytes) -> None:
        pass  # relayed as it is, nothing kept

    def content_chars(self, events: Sequence[SSEEvent]) -> int:
        return count_content(_CONTENT, events)

    def check_start(self, events: tuple[SSEEvent, ...]) -> Failure | None:
        return check_start(events)

    def wire(self, provider: ProviderConfig) -> Wire:
        if provider.azure is not None and provider.azure.auth == "api-key":
            return AZURE_WIRE
        return WIRE


DIALECT = OpenAI()
