"""A mock OpenAI-compatible upstream with fault injection: `cascade mock`, demo and test providers.

Faults are drawn per request from one seeded rng, in this order: 429 (with or without
Retry-After), 500, stall (accepts the request, never answers, and lets go once its client has
gone) and cut (the body stops mid-way and the connection drops). Everything else is a normal
answer after `latency`.

It answers like a model in an agent loop: when tools are offered and the conversation ends with
the user's own words, it calls a tool (the one tool_choice names, else the one the user's last
words name, else the first); once tool results come back, it answers in text that quotes them.
A tool_choice that forces a call (OpenAI "required" or a named function, Anthropic "any" or
"tool") always gets one. An Anthropic request asking for thinking gets a signed thinking block
first.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
import struct
import time
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote

import attrs
import trio

from router.config import MockSettings
from router.web.asgi import lifespan, read_body

Scope = MutableMapping[str, Any]
_MAX_BODY = 64 * 1024 * 1024


class _Cut(Exception):
    """Raised to end the app where it is: mid-response (a cut), or unanswered (a stall whose
    client has gone). `MockUpstream` returns with the response unfinished, and the server drops
    the connection: a cut on the wire, and no traceback in the log for a fault played on
    purpose."""


class MockUpstream:
    def __init__(self, settings: MockSettings, name: str = "mock") -> None:
        self.settings = settings
        self.name = name
        self.rng = random.Random(settings.seed)
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        try:
            await self._serve(scope, receive, send)
        except _Cut:
            return

    async def _serve(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(scope, receive, _MAX_BODY)
        if scope["method"] == "GET" and scope["path"].endswith("/models"):
            await _json(send, 200, {"object": "list", "data": [{"id": "mock", "object": "model"}]})
            return
        path = scope["path"]
        bedrock = _BEDROCK.match(path)
        if bedrock is not None:
            await self._bedrock(scope, receive, send, body, unquote(bedrock[1]), bedrock[2])
            return
        anthropic = path.endswith("/v1/messages")
        if not anthropic and not path.endswith("/chat/completions"):
            await _json(send, 404, {"error": {"message": "not found", "type": "not_found"}})
            return
        if "/openai/deployments/" in path and not await _azure_checks(scope, send):
            return
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            plan = _Planned.from_request(request, self.name, self.settings.chunks, anthropic)
        except (ValueError, AttributeError, TypeError):
            await _error(send, 400, "bad request", "invalid_request_error", anthropic)
            return
        self.requests += 1
        await self._answer(receive, send, plan)

    async def _bedrock(
        self, scope: Scope, receive: Any, send: Any, body: bytes, model: str, action: str
    ) -> None:
        """Claude on Bedrock: a signed call (SigV4's Authorization header; the signature is
        not checked), the model in the path, the answer or its binary event stream."""
        authorization = _header(scope, b"authorization")
        if not authorization.startswith("AWS4-HMAC-SHA256 Credential="):
            await _json(send, 403, {"message": "Missing Authentication Token"},
                        {"x-amzn-errortype": "MissingAuthenticationTokenException"})  # fmt: skip
            return
        try:
            request = json.loads(body)
            stream = action == "invoke-with-response-stream"
            plan = _Planned._from_messages(
                {**request, "model": model, "stream": stream}, self.name, self.settings.chunks
            )
        except (ValueError, AttributeError, TypeError):
            await _json(send, 400, {"message": "Malformed input request"},
                        {"x-amzn-errortype": "ValidationException"})  # fmt: skip
            return
        self.requests += 1
        await self._answer(receive, send, attrs.evolve(plan, bedrock=True))

    async def _answer(self, receive: Any, send: Any, plan: _Planned) -> None:
        if self.settings.latency:
            await trio.sleep(self.settings.latency)
        cut = await self._fault(receive, send, plan, self.rng.random())
        if cut is None:
            return  # answered with an error
        ident = f"msg_mock{self.requests}" if plan.anthropic else f"chatcmpl-mock{self.requests}"
        created = int(time.time())
        if not plan.stream:
            if cut:
                await send(_start(200, {"content-type": "application/json"}))
                await send({"type": "http.response.body", "body": b'{"id": "', "more_body": True})
                raise _Cut()
            answer = (
                plan.message_answer(ident) if plan.anthropic else plan.completion(ident, created)
            )
            await _json(send, 200, answer)
            return
        frames = (
            plan.anthropic_events(ident) if plan.anthropic else plan.openai_frames(ident, created)
        )
        if plan.bedrock:
            await self._stream(send, [_event_stream(f) for f in frames], cut, _EVENT_STREAM)
            return
        await self._stream(send, frames, cut)

    async def _fault(self, receive: Any, send: Any, plan: _Planned, roll: float) -> bool | None:
        """The fault `roll` falls on: a 429 or a 500 (answered here: None), a stall (no answer
        ever: ends the request once the client has gone), or whether the answer is to be cut
        half-way."""
        s = self.settings
        if roll < s.rate_429:
            headers = {} if s.retry_after is None else {"retry-after": f"{s.retry_after:g}"}
            if plan.bedrock:  # Bedrock's shape
                headers["x-amzn-errortype"] = "ThrottlingException"
                await _json(send, 429, {"message": "Too many requests (mock)"}, headers)
                return None
            await _error(send, 429, "mock rate limit", "rate_limit_error", plan.anthropic, headers)
            return None
        roll -= s.rate_429
        if roll < s.error_rate:
            if plan.bedrock:
                await _json(send, 500, {"message": "mock failure"},
                            {"x-amzn-errortype": "InternalServerException"})  # fmt: skip
                return None
            kind = "api_error" if plan.anthropic else "server_error"
            await _error(send, 500, "mock failure", kind, plan.anthropic)
            return None
        roll -= s.error_rate
        if roll < s.stall_rate:
            # The body has been read, so the next message is the client's disconnect. Waiting
            # for it, not forever, closes the connection the client left (else CLOSE_WAIT).
            while (await receive())["type"] != "http.disconnect":
                pass
            raise _Cut()
        return roll - s.stall_rate < s.cut_rate

    async def _stream(
        self, send: Any, frames: list[bytes], cut: bool, kind: str = "text/event-stream"
    ) -> None:
        await send(_start(200, {"content-type": kind, "cache-control": "no-cache"}))
        for i, data in enumerate(frames):
            if self.settings.chunk_interval and i:
                await trio.sleep(self.settings.chunk_interval)
            if cut and i == len(frames) // 2:
                raise _Cut()
            await _more(send, data)
        await send({"type": "http.response.body", "body": b""})


_BEDROCK = re.compile(r"^/model/([^/]+)/(invoke|invoke-with-response-stream)\Z")
_EVENT_STREAM = "application/vnd.amazon.eventstream"


def _header(scope: Scope, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), "")


async def _azure_checks(scope: Scope, send: Any) -> bool:
    """An Azure OpenAI deployment's call: its api-version and a key or token, as Azure checks."""
    if b"api-version=" not in scope.get("query_string", b""):
        await _json(send, 404, {"error": {"code": "404", "message": "Resource not found"}})
        return False
    if not (_header(scope, b"api-key") or _header(scope, b"authorization")):
        message = "Access denied due to missing subscription key or bearer token."
        await _json(send, 401, {"error": {"code": "401", "message": message}})
        return False
    return True


def _event_stream(sse: bytes) -> bytes:
    """One Anthropic SSE event as Bedrock's event-stream message: a `chunk` event whose payload
    carries the event's JSON, base64-encoded (prelude and message CRC32s as AWS frames them)."""
    data = sse.split(b"data: ", 1)[1].rstrip(b"\n")
    payload = json.dumps({"bytes": base64.b64encode(data).decode()}).encode()
    headers = b"".join(
        bytes([len(k)]) + k + b"\x07" + struct.pack(">H", len(v)) + v
        for k, v in ((b":event-type", b"chunk"), (b":message-type", b"event"),
                     (b":content-type", b"application/json"))
    )  # fmt: skip
    prelude = struct.pack(">II", 12 + len(headers) + len(payload) + 4, len(headers))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + headers + payload
    return message + struct.pack(">I", binascii.crc32(message))


async def _error(
    send: Any,
    status: int,
    message: str,
    kind: str,
    anthropic: bool,
    headers: dict[str, str] | None = None,
) -> None:
    if anthropic:
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        code = "rate_limit_exceeded" if status == 429 else None
        body = {"error": {"message": message, "type": kind, "code": code}}
    await _json(send, status, body, headers)


@attrs.frozen
class _Planned:
    """What the mock will answer to one request: text, JSON or a tool call, n choices, at most
    max_tokens words (one word is one token here)."""

    model: str
    name: str
    stream: bool
    include_usage: bool
    words: int  # the answer's length before max_tokens
    choices: int
    max_tokens: int | None
    tool: dict[str, Any] | None  # the function to call, when tools were given
    json_schema: dict[str, Any] | None  # response_format: json_object ({}) or json_schema
    anthropic: bool = False  # the request came to /v1/messages: answer in Anthropic's shape
    results: str | None = None  # the tool results the conversation ends with, quoted back
    thinking: bool = False  # (Anthropic) thinking was asked for: a thinking block comes first
    bedrock: bool = False  # Claude on Bedrock: its error shapes, its binary event stream
    # The assistant text the conversation ends with (a prefill): the answer continues it,
    # from the word after its last (a stream Cascade resumes, docs/failure-semantics.md)
    prefill: str | None = None

    @classmethod
    def from_request(
        cls, request: dict[str, Any], name: str, words: int, anthropic: bool = False
    ) -> _Planned:
        if anthropic:
            return cls._from_messages(request, name, words)
        options = request.get("stream_options") or {}
        fmt = request.get("response_format") or {}
        schema: dict[str, Any] | None = None
        if fmt.get("type") == "json_object":
            schema = {}
        elif fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") or {}
        results, said = _openai_turn(request.get("messages"))
        choice = request.get("tool_choice")
        forced = choice == "required" or isinstance(choice, dict)
        prefill = _prefill(request.get("messages"))
        return cls(
            model=str(request.get("model", "mock")),
            name=name,
            stream=bool(request.get("stream")),
            include_usage=bool(options.get("include_usage")),
            words=words,
            choices=max(1, int(request.get("n") or 1)),
            max_tokens=request.get("max_completion_tokens") or request.get("max_tokens"),
            tool=_chosen_tool(request.get("tools"), choice, said)
            if (results is None or forced) and prefill is None
            else None,
            json_schema=schema,
            results=results,
            prefill=prefill,
        )

    @classmethod
    def _from_messages(cls, request: dict[str, Any], name: str, words: int) -> _Planned:
        """A Messages API request's plan."""
        results, said = _anthropic_turn(request.get("messages"))
        choice = request.get("tool_choice")
        forced = isinstance(choice, dict) and choice.get("type") in ("any", "tool")
        thinking = request.get("thinking")
        prefill = _prefill(request.get("messages"))
        return cls(
            model=str(request.get("model", "mock")),
            name=name,
            stream=bool(request.get("stream")),
            include_usage=True,
            words=words,
            choices=1,
            max_tokens=request.get("max_tokens"),
            tool=_chosen_anthropic_tool(request.get("tools"), choice, said)
            if (results is None or forced) and prefill is None
            else None,
            json_schema=None,
            anthropic=True,
            results=results,
            thinking=isinstance(thinking, dict) and thinking.get("type") != "disabled",
            prefill=prefill,
        )

    @property
    def finish(self) -> str:
        if self.tool is not None:
            return "tool_calls"
        return "length" if self.truncated else "stop"

    @property
    def truncated(self) -> bool:
        return self.max_tokens is not None and self.max_tokens < self.words

    @property
    def _first_word(self) -> int:
        """The first word to say: after the prefill's last `wordN`, when it has one."""
        said = _WORDS.findall(self.prefill or "")
        return int(said[-1]) + 1 if said else 0

    def text(self, index: int) -> str:
        count = self.words if self.max_tokens is None else min(self.words, self.max_tokens)
        if self.prefill is not None:  # its continuation: the words after it, no name again
            return "".join(f" word{i}" for i in range(self._first_word, count))
        words = " ".join(f"word{i}" for i in range(count))
        prefix = f"[{self.name}]" + (f"[{index}]" if self.choices > 1 else "")
        if self.results is not None:  # the tool answered: say what it said
            prefix += f" the tool said: {' '.join(self.results.split())[:200]}"
        if self.json_schema is not None:
            return json.dumps(_example(self.json_schema, f"{prefix} {words}"))
        return f"{prefix} {words}"

    def arguments(self) -> str:
        assert self.tool is not None
        return json.dumps(_example(self.tool.get("parameters") or {}, f"[{self.name}]"))

    def usage(self) -> dict[str, int]:
        said = self._first_word if self.prefill is not None else 0
        completion = self.choices * max(0, min(self.words, self.max_tokens or self.words) - said)
        return {
            "prompt_tokens": 10,
            "completion_tokens": completion,
            "total_tokens": 10 + completion,
        }

    def message(self, index: int) -> dict[str, Any]:
        if self.tool is None:
            return {"role": "assistant", "content": self.text(index)}
        call = {
            "id": f"call_mock{index}",
            "type": "function",
            "function": {"name": self.tool["name"], "arguments": self.arguments()},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def completion(self, ident: str, created: int) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": self.model,
            "choices": [
                {"index": i, "message": self.message(i), "finish_reason": self.finish}
                for i in range(self.choices)
            ],
            "usage": self.usage(),
        }

    def chunk(self, ident: str, created: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.model,
            "choices": choices,
        }

    def openai_frames(self, ident: str, created: int) -> list[bytes]:
        frames = [
            _sse(self.chunk(ident, created, [{"index": i, "delta": d, "finish_reason": f}]))
            for i, d, f in self.deltas()
        ]
        if self.include_usage:
            frames.append(_sse({**self.chunk(ident, created, []), "usage": self.usage()}))
        frames.append(b"data: [DONE]\n\n")
        return frames

    @property
    def stop_reason(self) -> str:
        if self.tool is not None:
            return "tool_use"
        return "max_tokens" if self.truncated else "end_turn"

    def message_answer(self, ident: str) -> dict[str, Any]:
        """A Messages API answer."""
        if self.tool is None:
            content: list[dict[str, Any]] = [{"type": "text", "text": self.text(0)}]
        else:
            arguments = json.loads(self.arguments())
            content = [
                {
                    "type": "tool_use",
                    "id": "toolu_mock0",
                    "name": self.tool["name"],
                    "input": arguments,
                }
            ]
        if self.thinking:
            content.insert(0, {"type": "thinking", "thinking": self.thought, "signature": _SIGNED})
        usage = self.usage()
        return {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
            },
        }

    def anthropic_events(self, ident: str) -> list[bytes]:
        """A Messages API stream, every event Anthropic sends (ping included)."""
        usage = self.usage()
        start = {**self.message_answer(ident), "content": [], "stop_reason": None}
        start["usage"] = {"input_tokens": usage["prompt_tokens"], "output_tokens": 1}
        events = [_event("message_start", {"type": "message_start", "message": start})]
        index = 0
        if self.thinking:  # a thinking block first, its text and then its signature
            events += _block_events(
                0,
                {"type": "thinking", "thinking": "", "signature": ""},
                [
                    {"type": "thinking_delta", "thinking": self.thought},
                    {"type": "signature_delta", "signature": _SIGNED},
                ],
            )
            index = 1
        if self.tool is None:
            block: dict[str, Any] = {"type": "text", "text": ""}
            text = self.text(0)
            parts = [p + " " for p in text.split(" ")[:-1]] + [text.split(" ")[-1]]
            deltas = [{"type": "text_delta", "text": p} for p in parts]
        else:
            block = {
                "type": "tool_use",
                "id": "toolu_mock0",
                "name": self.tool["name"],
                "input": {},
            }
            arguments = self.arguments()
            step = max(1, len(arguments) // 4)
            deltas = [
                {"type": "input_json_delta", "partial_json": arguments[i : i + step]}
                for i in range(0, len(arguments), step)
            ]
        events.append(_event("ping", {"type": "ping"}))
        events += _block_events(index, block, deltas)
        delta = {"stop_reason": self.stop_reason, "stop_sequence": None}
        events.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": delta,
                    "usage": {"output_tokens": usage["completion_tokens"]},
                },
            )
        )
        events.append(_event("message_stop", {"type": "message_stop"}))
        return events

    @property
    def thought(self) -> str:
        return f"[{self.name}] thinking about it"

    def deltas(self) -> list[tuple[int, dict[str, Any], str | None]]:
        """(choice index, delta, finish_reason) in stream order: each choice in turn, a word
        per content delta; a tool call's arguments in several pieces, as real providers send."""
        out: list[tuple[int, dict[str, Any], str | None]] = []
        for i in range(self.choices):
            if self.tool is None:
                text = self.text(i)
                pieces = [p + " " for p in text.split(" ")[:-1]] + [text.split(" ")[-1]]
                out.append((i, {"role": "assistant", "content": pieces[0]}, None))
                out += [(i, {"content": p}, None) for p in pieces[1:]]
            else:
                head = {
                    "index": 0,
                    "id": f"call_mock{i}",
                    "type": "function",
                    "function": {"name": self.tool["name"], "arguments": ""},
                }
                out.append((i, {"role": "assistant", "content": None, "tool_calls": [head]}, None))
                arguments = self.arguments()
                step = max(1, len(arguments) // 4)
                for start in range(0, len(arguments), step):
                    piece = {"index": 0, "function": {"arguments": arguments[start : start + step]}}
                    out.append((i, {"tool_calls": [piece]}, None))
            out.append((i, {}, self.finish))
        return out


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text of its text parts and blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            _text(part.get("text") if part.get("type") == "text" else part.get("content"))
            for part in content
            if isinstance(part, dict)
        )
    return ""


_WORDS = re.compile(r"\bword(\d+)\b")


def _prefill(messages: Any) -> str | None:
    """The assistant text the conversation ends with, if it does (a prefill)."""
    spoken = _spoken(messages)
    last = spoken[-1] if spoken else None
    if not isinstance(last, dict) or last.get("role") != "assistant" or last.get("tool_calls"):
        return None
    return _text(last.get("content"))


def _spoken(messages: Any) -> list[Any]:
    """The conversation without its trailing system messages (instructions, not a turn)."""
    out = list(messages) if isinstance(messages, list) else []
    while out and isinstance(out[-1], dict) and out[-1].get("role") in ("system", "developer"):
        out.pop()
    return out


def _openai_turn(messages: Any) -> tuple[str | None, str]:
    """(the tool results the conversation ends with, or None; the user's last words)."""
    messages = _spoken(messages)
    results = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        results.append(_text(message.get("content")))
    if results:
        return " ".join(reversed(results)), ""
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    return None, _text(last.get("content")) if last.get("role") == "user" else ""


def _anthropic_turn(messages: Any) -> tuple[str | None, str]:
    """The same for a Messages conversation: tool_result blocks in its last user turn."""
    spoken = _spoken(messages)
    last = spoken[-1] if spoken else {}
    if not isinstance(last, dict) or last.get("role") != "user":
        return None, ""
    content = last.get("content")
    blocks = content if isinstance(content, list) else []
    results = [
        _text(b.get("content"))
        for b in blocks
        if isinstance(b, dict) and b.get("type") == "tool_result"
    ]
    if results:
        return " ".join(results), ""
    texts = [b for b in blocks if isinstance(b, dict) and b.get("type") == "text"]
    return None, _text(content if isinstance(content, str) else texts[-1:])


def _pick(functions: list[dict[str, Any]], said: str) -> dict[str, Any]:
    """The tool the user's last words name (as a whole word), else the first."""
    words = set(re.findall(r"[A-Za-z0-9_-]+", said))
    return next((f for f in functions if f.get("name") in words), functions[0])


def _chosen_tool(tools: Any, choice: Any, said: str = "") -> dict[str, Any] | None:
    """The function the mock calls: the one tool_choice names, else the one the user's words
    name, else the first (none: none)."""
    functions = [t["function"] for t in tools or [] if isinstance(t, dict) and "function" in t]
    if not functions or choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        return next((f for f in functions if f.get("name") == wanted), functions[0])
    return _pick(functions, said)


def _chosen_anthropic_tool(tools: Any, choice: Any, said: str = "") -> dict[str, Any] | None:
    """Anthropic's tools ({name, input_schema}) as the function the mock calls, or None."""
    functions = [
        {"name": t["name"], "parameters": t.get("input_schema") or {}}
        for t in tools or []
        if isinstance(t, dict) and "name" in t
    ]
    kind = choice.get("type") if isinstance(choice, dict) else None
    if not functions or kind == "none":
        return None
    if kind == "tool":
        return next((f for f in functions if f["name"] == choice.get("name")), functions[0])
    return _pick(functions, said)


_SIGNED = "bW9jay1zaWduYXR1cmU="  # a thinking block's signature (a real one is opaque, too)


def _block_events(index: int, block: dict[str, Any], deltas: list[dict[str, Any]]) -> list[bytes]:
    """One content block of a Messages stream: its start, its deltas, its stop."""
    start = {"type": "content_block_start", "index": index, "content_block": block}
    return [
        _event("content_block_start", start),
        *(
            _event(
                "content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}
            )
            for d in deltas
        ),
        _event("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\n" + _sse(data)


def _example(schema: dict[str, Any], text: str) -> Any:
    """A value that fits a JSON schema's shape (types and required properties), for the mock."""
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object" or (kind is None and "properties" in schema) or schema == {}:
        properties = schema.get("properties") or {"answer": {"type": "string"}}
        return {key: _example(sub, text) for key, sub in properties.items()}
    if kind == "array":
        return [_example(schema.get("items") or {"type": "string"}, text)]
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _start(status: int, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }


async def _more(send: Any, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _json(send: Any, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(obj).encode()
    await send(_start(status, {"content-type": "application/json", **(headers or {})}))
    await send({"type": "http.response.body", "body": body})
