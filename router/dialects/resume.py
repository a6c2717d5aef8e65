"""Continuing a stream on another target after its provider failed mid-answer (issue 23,
docs/failure-semantics.md "Resuming a stream").

The client's stream is written by one writer from one upstream dialect (the failed attempt's,
"A"). While a route may resume, a `Transcript` reads the A events the writer relays: the text
so far, the ids, the content blocks, and whether the answer can be continued at all (text only:
no tool call, no thinking, one choice). To resume, the request is sent again with that text as
the start of the assistant's turn (`prefilled`); the continuation's events, whatever dialect its
provider speaks ("B"), are translated to A (`to_dialect`) and spliced (`Splice`: its opening
dropped, its ids and block indexes made the first attempt's, its usage counting both), then
given to the same writer. The client sees one stream: one id, one block, one end.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from actors.sse import SSEDecoder, SSEEvent
from router.dialects.base import ClientRequest, Dialect, StreamWriter
from router.dialects.jsonbody import event_object
from router.dialects.responses import Conversation, ResponsesRequest
from router.dialects.translate import AnthropicToOpenAIStream, OpenAIToAnthropicStream

DONE = b"[DONE]"


class Transcript(Protocol):
    why_not: str | None  # why it cannot be continued (None: it can)

    @property
    def text(self) -> str:
        """The answer's text the client has received."""

    def observe(self, events: Sequence[SSEEvent]) -> None: ...

    def splice(self, lead: str) -> Splice:
        """A splice of a continuation into this stream; `lead`: the whitespace the prefill
        left out (a continuation that starts with it does not repeat it)."""


class Splice(Protocol):
    def adapt(self, events: Sequence[SSEEvent]) -> list[SSEEvent]: ...


def transcript(dialect: str) -> Transcript | None:
    """A transcript of a stream in `dialect` (None: a stream of it is not resumed)."""
    if dialect == "openai":
        return ChatTranscript()
    if dialect == "anthropic":
        return MessagesTranscript()
    return None


# --- OpenAI chat completions ---------------------------------------------------------------------


@attrs.define
class _Kept:
    """What both transcripts keep: why the answer cannot be continued (None: it can), and its
    text as the JSON string fragments the events held (pattern matches, no parse), decoded once,
    when a resume asks for it."""

    why_not: str | None = None
    _parts: list[bytes] = attrs.field(factory=list)

    @property
    def text(self) -> str:
        text: str = json.loads(b'"' + b"".join(self._parts) + b'"')
        return text


@attrs.define
class ChatTranscript(_Kept):
    """What the client has been sent of a chat completions stream: a find and a match or two
    per event."""

    head: dict[str, Any] = attrs.field(factory=dict)  # id, created, model… of the first chunk

    def observe(self, events: Sequence[SSEEvent]) -> None:
        for event in events:
            data = event.data
            if not self.head and data != DONE:
                chunk = event_object(data)
                if chunk is not None:
                    self.head = {k: chunk[k] for k in _CHAT_HEAD if k in chunk}
            at = data.find(b'"content"')
            while at >= 0:  # (a find is far cheaper than a pattern's scan of the whole event)
                if (found := _CHAT_TEXT.match(data, at)) is not None:
                    self._parts.append(found.group(1))
                at = data.find(b'"content"', at + 9)
            if self.why_not is None:
                self._why_not(data)

    def _why_not(self, data: bytes) -> None:
        """Whether this event makes the answer one that cannot be continued."""
        if (stop := _CHAT_STOPS.search(data)) is not None:
            self.why_not = _CHAT_WHY[stop.lastgroup or ""]

    def splice(self, lead: str) -> ChatSplice:
        return ChatSplice(self.head, lead, len(self.text) // 4)


_CHAT_TEXT = re.compile(rb'"content"\s*:\s*"((?:[^"\\]|\\.)*)"')
# What makes a chat completions answer one that cannot be continued, in one search (non-empty
# values only: providers send `"refusal": null` and `"reasoning_content": ""`)
_CHAT_STOPS = re.compile(
    rb'"(?:(?:tool_calls"\s*:\s*\[\s*\{|function_call"\s*:\s*\{)(?P<tool>)'
    rb'|(?:reasoning_content|refusal)"\s*:\s*"[^"](?P<reasoning>)'
    rb'|finish_reason"\s*:\s*"(?P<finished>))'
)
_CHAT_WHY = {
    "tool": "a tool call had begun",
    "reasoning": "the answer had reasoning or a refusal",
    "finished": "the answer was complete",
}


_CHAT_HEAD = ("id", "created", "model", "system_fingerprint")


@attrs.define
class ChatSplice:
    """Continuation chunks as more of the first stream: its id, created and model; no role
    delta; the usage chunk's completion tokens counting the first attempt's text too."""

    head: dict[str, Any]
    lead: str
    earlier: int  # output tokens of the first attempt (its text / 4)
    _started: bool = False  # the continuation's first text has passed

    def adapt(self, events: Sequence[SSEEvent]) -> list[SSEEvent]:
        out = []
        for event in events:
            chunk = event_object(event.data) if event.data != DONE else None
            if chunk is None:
                out.append(event)
                continue
            if "error" in chunk:
                out.append(event)
                continue
            chunk.update(self.head)
            choices = [c for c in (self._choice(c) for c in chunk.get("choices") or ()) if c]
            if chunk.get("choices") and not choices and not chunk.get("usage"):
                continue  # an opening chunk (the role), nothing else
            chunk["choices"] = choices
            if isinstance(usage := chunk.get("usage"), dict):
                usage["completion_tokens"] = usage.get("completion_tokens", 0) + self.earlier
                usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage["completion_tokens"]
            out.append(SSEEvent(json.dumps(chunk).encode()))
        return out

    def _choice(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        delta = choice.get("delta") or {}
        delta.pop("role", None)
        if isinstance(content := delta.get("content"), str):
            if not self._started and content:
                content = _without_lead(content, self.lead)
                self._started = bool(content)
            if content:
                delta["content"] = content
            else:
                del delta["content"]
        if not delta and not choice.get("finish_reason"):
            return None
        choice["delta"] = delta
        return choice


# --- Anthropic messages --------------------------------------------------------------------------


@attrs.define
class MessagesTranscript(_Kept):
    """What the client has been sent of a Messages stream, by pattern matches (no parse)."""

    blocks: int = 0  # content blocks started
    open: bool = False  # the last one is a text block not yet stopped

    def observe(self, events: Sequence[SSEEvent]) -> None:
        for event in events:
            data = event.data
            kind = event.event or _kind(data)
            if kind == b"content_block_delta":
                self._parts += _MESSAGES_TEXT.findall(data)
                if self.why_not is None and (other := _NOT_TEXT.search(data)) is not None:
                    self.why_not = f"a {other.group(1).decode()} had begun"
            elif kind == b"content_block_start":
                self.blocks += 1
                self.open = _TEXT_BLOCK.search(data) is not None
                if self.open:
                    self._parts += _MESSAGES_TEXT.findall(data)
                else:
                    self.why_not = self.why_not or "a tool use or thinking block had begun"
            elif kind == b"content_block_stop":
                self.open = False
            elif kind in (b"message_delta", b"message_stop"):
                self.why_not = self.why_not or "the answer was complete"

    def splice(self, lead: str) -> MessagesSplice:
        # The continuation's first text block continues the open one; its other blocks follow
        return MessagesSplice(self.blocks - 1 if self.open else self.blocks, self.open, lead,
                              len(self.text) // 4)  # fmt: skip


def _kind(data: bytes) -> bytes:
    """An event's type, when it came without its `event:` line (its first "type" is its own)."""
    found = _TYPE.search(data)
    return found.group(1) if found is not None else b""


_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_]+)"')
_MESSAGES_TEXT = re.compile(rb'"text"\s*:\s*"((?:[^"\\]|\\.)*)"')
_NOT_TEXT = re.compile(
    rb'"type"\s*:\s*"(input_json_delta|thinking_delta|signature_delta|citations_delta)"'
)
_TEXT_BLOCK = re.compile(rb'"content_block"\s*:\s*\{\s*"type"\s*:\s*"text"')


@attrs.define
class MessagesSplice:
    """Continuation events as more of the first stream: no message_start (its id stays the
    first's), the first text block merged into the open one, block indexes after the first
    attempt's, the final usage's output tokens counting the first attempt's text too."""

    offset: int  # the continuation's block i is the client's block offset + i
    merge: bool  # the continuation's block 0, when text, is the open block
    lead: str
    earlier: int
    _merged: bool = False  # the continuation's block 0 was merged into the open one
    _started: bool = False

    def adapt(self, events: Sequence[SSEEvent]) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        for event in events:
            data = event_object(event.data)
            kind = data.get("type") if data is not None else None
            if data is None or kind in ("message_start", "ping"):
                continue
            if "index" in data and kind != "content_block_start":
                data["index"] = self.offset + int(data["index"])
            if kind == "content_block_start":
                if self._start(data, out):
                    continue
            elif kind == "content_block_delta":
                if not self._text(data):
                    continue
            elif kind == "message_delta" and isinstance(usage := data.get("usage"), dict):
                usage["output_tokens"] = int(usage.get("output_tokens") or 0) + self.earlier
            out.append(SSEEvent(json.dumps(data).encode(), event.event))
        return out

    def _start(self, data: dict[str, Any], out: list[SSEEvent]) -> bool:
        """A block's start; True when it is dropped (merged into the open block)."""
        index = int(data.get("index", 0))
        block = data.get("content_block") or {}
        if index == 0 and self.merge:
            if block.get("type") == "text":
                self._merged = True
                if block.get("text"):  # a start that carries text: keep it as a delta
                    delta = {"type": "content_block_delta", "index": self.offset,
                             "delta": {"type": "text_delta", "text": block["text"]}}  # fmt: skip
                    if self._text(delta):
                        out.append(SSEEvent(json.dumps(delta).encode(), b"content_block_delta"))
                return True
            # the open block ends here; the continuation's blocks come after it
            stop = {"type": "content_block_stop", "index": self.offset}
            out.append(SSEEvent(json.dumps(stop).encode(), b"content_block_stop"))
            self.offset += 1
        data["index"] = self.offset + index
        return False

    def _text(self, data: dict[str, Any]) -> bool:
        """Strip the lead the prefill left out from the first text; False: nothing left."""
        delta = data.get("delta") or {}
        if self._started or delta.get("type") != "text_delta":
            return True
        text = _without_lead(str(delta.get("text", "")), self.lead)
        if not text:
            return False
        delta["text"], self._started = text, True
        return True


# --- requests ------------------------------------------------------------------------------------


def split_prefill(text: str) -> tuple[str, str]:
    """(the prefill, the whitespace it leaves out): Anthropic refuses a final assistant turn
    that ends with whitespace, so none does; the continuation then starts with it."""
    kept = text.rstrip()
    return kept, text[len(kept) :]


def prefilled(face: Dialect, request: ClientRequest, text: str) -> ClientRequest:
    """The client's request (`face` dialect) with `text` as the start of the assistant's turn:
    a trailing assistant message (an assistant item for the Responses API)."""
    if isinstance(request, ResponsesRequest):
        item = {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": text}]}  # fmt: skip
        conversation = Conversation([*request.conversation.items, item])
        conversation.id = request.conversation.id
        return attrs.evolve(request, conversation=conversation)
    obj = dict(request.obj)
    if face.name == "openai":
        obj["messages"] = [*obj["messages"], {"role": "assistant", "content": text}]
    else:
        message = {"role": "assistant", "content": [{"type": "text", "text": text}]}
        obj["messages"] = [*obj["messages"], message]
        # Anthropic refuses a prefilled turn with thinking on; the answer continued had none
        # (a thinking block makes it one that is not resumed), so it goes without
        obj.pop("thinking", None)
    again = face.parse(json.dumps(obj).encode())
    return again.asking_usage() if getattr(request, "want_usage", False) else again


def prefill_for(mode: str, body: bytes) -> bytes:
    """An OpenAI-dialect body whose last message is the prefill, as the provider takes it."""
    if mode == "trailing":
        return body
    obj = json.loads(body)
    if mode == "prefix":
        obj["messages"][-1]["prefix"] = True
    elif mode == "continue_final_message":
        obj["continue_final_message"], obj["add_generation_prompt"] = True, False
    return json.dumps(obj).encode()


def _without_lead(text: str, lead: str) -> str:
    """`text` without the whitespace the prefill left out, when it starts with it (or with
    whitespace at all: a continuation that repeats a space would show two)."""
    if not lead:
        return text
    if text.startswith(lead):
        return text[len(lead) :]
    return text.lstrip() if text[:1].isspace() else text


# --- dialects ------------------------------------------------------------------------------------


def to_dialect(first: str, then: str) -> ToDialect | None:
    """How a continuation from a provider of dialect `then` becomes events of `first` (None:
    the same dialect)."""
    if first == then:
        return None
    if (first, then) == ("openai", "anthropic"):
        return ToDialect(AnthropicToOpenAIStream(include_usage=True))
    assert (first, then) == ("anthropic", "openai"), (first, then)
    return ToDialect(OpenAIToAnthropicStream())


class ToDialect:
    """A continuation's events (dialect B) as dialect A's: through the stream translator that
    writes A for a B upstream, and back into events."""

    def __init__(self, writer: StreamWriter) -> None:
        self._writer = writer
        self._decoder = SSEDecoder()

    def __call__(self, events: Sequence[SSEEvent]) -> tuple[list[SSEEvent], str | None]:
        data, error = self._writer.relay(events)
        return self._decoder.feed(data), error

    def finish(self) -> list[SSEEvent]:
        """The end, when the continuation's upstream ended without its dialect's own."""
        return self._decoder.feed(self._writer.finish())


class Observed:
    """The client's writer, with a transcript reading what it relays."""

    def __init__(self, inner: StreamWriter, transcript: Transcript) -> None:
        self.inner = inner
        self.transcript = transcript

    @property
    def done(self) -> bool:
        return self.inner.done

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        self.transcript.observe(events)
        return self.inner.relay(events)

    def finish(self) -> bytes:
        return self.inner.finish()

    def fail(self, message: str, code: str) -> bytes:
        return self.inner.fail(message, code)


class Continued:
    """The client's writer after a resume: the continuation's events translated to the first
    attempt's dialect (`convert`, None when it is the same), spliced, then written as before."""

    def __init__(self, observed: Observed, convert: ToDialect | None, splice: Splice) -> None:
        self.observed = observed
        self._convert = convert
        self._splice = splice

    @property
    def done(self) -> bool:
        return self.observed.done

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        error = None
        if self._convert is not None:
            events, error = self._convert(events)
        data, own_error = self.observed.relay(self._splice.adapt(events))
        return data, error or own_error

    def finish(self) -> bytes:
        data = b""
        if self._convert is not None and not self.observed.done:
            data, _ = self.observed.relay(self._splice.adapt(self._convert.finish()))
        return data + self.observed.finish()

    def fail(self, message: str, code: str) -> bytes:
        return self.observed.fail(message, code)
