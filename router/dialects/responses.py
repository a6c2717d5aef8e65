"""OpenAI's Responses API (`POST /v1/responses`) as a client face: the request, translated to chat
completions for OpenAI-dialect providers (and through them to messages for Anthropic-dialect
ones), and the answer and stream written back as a `response` and its events.

A request's `input` (a string or items) becomes chat messages: `instructions` and system or
developer messages the system prompt, `function_call` items an assistant turn's tool calls,
`function_call_output` items tool messages; `reasoning` items are dropped. A conversation
continued with `previous_response_id` arrives here already whole (router/face/conversations.py
puts the stored items before the new ones). docs/dialects.md has the tables.

Streams follow the sequence a real OpenAI server sends, each event numbered from 0:
`response.created`, `response.in_progress`, then per output item `response.output_item.added`,
its content (`response.content_part.added`, `response.output_text.delta`…,
`response.output_text.done`, `response.content_part.done`; or
`response.function_call_arguments.delta`…, `.done`), `response.output_item.done` with the whole
item; items one after the other, never interleaved; then `response.completed` (or
`response.incomplete`) holding every item, or `response.failed` when the upstream fails after
the stream began. No `[DONE]`.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from actors.outcome import Failure, Kind
from actors.settings import ProviderConfig
from actors.sse import SSEDecoder, SSEEvent
from actors.wire import Usage
from router.dialects import openai
from router.dialects.base import JSONRequest, StreamWriter, UpstreamCall, upstream_call
from router.dialects.jsonbody import (
    MAX_OUTPUT_TOKENS,
    bounded_int,
    content_counter,
    count_content,
    dumps,
    event_object,
    finite_number,
    optional,
    parse_object,
    required_model,
    want_list,
    want_object,
    want_string,
)
from router.dialects.translate import Crossing
from router.errors import RequestError, Untranslatable

PATH = "/responses"

# The fields translated below, or handled by Cascade itself (previous_response_id, store), or
# dropped as shaping nothing a chat completion says (include, metadata, prompt_cache_key, ...).
_TAKEN = frozenset({"store", "include", "prompt_cache_key", "prompt_cache_retention",
                      "metadata", "client_metadata", "truncation", "service_tier",
                      "safety_identifier", "previous_response_id", "background",
                      "stream_options", "user", "model", "input", "instructions", "stream",
                      "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
                      "temperature", "top_p", "text", "reasoning"})  # fmt: skip
_ROLES = ("user", "assistant", "system", "developer")


class Conversation:
    """One Responses request's own state: its id, the input items it was served with (the
    stored ones of `previous_response_id` first), and the response written back (to store)."""

    __slots__ = ("final", "id", "items")

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.id = "resp_" + secrets.token_hex(24)
        self.items = items
        self.final: dict[str, Any] | None = None  # the response, once written whole


@attrs.frozen
class ResponsesRequest(JSONRequest):
    """A validated Responses request and what the cascade needs from it."""

    conversation: Conversation = attrs.field(factory=lambda: Conversation([]), eq=False)

    @property
    def store(self) -> bool:
        return self.obj.get("store") is not False

    @property
    def previous_response_id(self) -> str | None:
        value = self.obj.get("previous_response_id")
        return value if isinstance(value, str) else None

    def call_for(self, upstream: Any, model: str) -> UpstreamCall:
        """To a native provider: the client's bytes with `model` replaced; a continuation of a
        conversation Cascade stored carries that conversation in `input` instead (the provider
        never saw Cascade's response ids)."""
        if self.previous_response_id is None:
            return super().call_for(upstream, model)
        obj = {k: v for k, v in self.obj.items() if k != "previous_response_id"}
        body = json.dumps({**obj, "model": model, "input": self.conversation.items}).encode()
        return upstream_call(upstream, body, self.stream)

    def continuing(self, history: list[dict[str, Any]]) -> ResponsesRequest:
        """This request with the stored conversation before its own input."""
        conversation = Conversation([*history, *self.conversation.items])
        conversation.id = self.conversation.id
        return attrs.evolve(self, conversation=conversation)


def input_items(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """`input` as a list of items (a string is one user message)."""
    given = obj.get("input")
    if isinstance(given, str):
        return [{"type": "message", "role": "user", "content": given}]
    return [want_object(item, f"input[{i}]") for i, item in enumerate(want_list(given, "input"))]


def parse_responses_request(body: bytes) -> ResponsesRequest:
    text, obj, spans = parse_object(body)
    model = required_model(obj)
    given = obj.get("input")
    if not isinstance(given, str | list) or not given:
        raise RequestError(
            "'input' is required: a string or a non-empty list of items", param="input"
        )
    items = input_items(obj)
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") not in _ROLES:
            raise RequestError(
                f"'input[{i}].role' must be one of {', '.join(_ROLES)}", param=f"input[{i}].role"
            )
    optional(obj, "instructions", (str,), "a string")
    optional(obj, "stream", (bool,), "a boolean")
    optional(obj, "store", (bool,), "a boolean")
    optional(obj, "previous_response_id", (str,), "a string")
    optional(obj, "tools", (list,), "a list")
    optional(obj, "text", (dict,), "an object")
    optional(obj, "reasoning", (dict,), "an object")
    optional(obj, "parallel_tool_calls", (bool,), "a boolean")
    bounded_int(obj, "max_output_tokens", MAX_OUTPUT_TOKENS)
    for key in ("temperature", "top_p"):
        finite_number(obj, key)
    max_output = obj.get("max_output_tokens")
    return ResponsesRequest(
        dialect="responses",
        text=text,
        model_span=spans["model"],
        model=model,
        stream=bool(obj.get("stream")),
        obj=obj,
        estimated_tokens=len(body) // 4 + (max_output or 0),
        estimated_input_tokens=len(body) // 4,
        max_output_tokens=max_output,
        conversation=Conversation(items),
    )


# --- requests: Responses -> chat completions ---------------------------------------------------


def _parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content: a string, or text and image parts."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, given in enumerate(want_list(content, where)):
        here = f"{where}[{j}]"
        part = want_object(given, here)
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": want_string(part.get("text"), f"{here}.text")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        else:
            raise Untranslatable(f"'{here}': a {kind!r} part cannot be translated", param=here)
    return parts


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def _chat_messages(obj: dict[str, Any], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if obj.get("instructions"):
        messages.append({"role": "system", "content": obj["instructions"]})
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item["role"]
            content = _parts(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                messages.append({"role": "system", "content": _text(content)})
            elif role == "assistant":
                messages.append({"role": "assistant", "content": _text(content)})
            else:
                messages.append({"role": "user", "content": content})
        elif kind == "function_call":
            call = {
                "id": want_string(item.get("call_id"), f"{where}.call_id"),
                "type": "function",
                "function": {
                    "name": flat_name(
                        want_string(item.get("name"), f"{where}.name"), item.get("namespace")
                    ),
                    "arguments": want_string(item.get("arguments"), f"{where}.arguments", "{}"),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # one turn, several calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({
                "role": "tool",
                "tool_call_id": want_string(item.get("call_id"), f"{where}.call_id"),
                "content": output if isinstance(output, str) else _text(_parts(output, where)),
            })  # fmt: skip
        elif kind == "reasoning":
            continue  # the upstream's own reasoning, encrypted for it: dropped when translating
        else:
            raise Untranslatable(f"'{where}': a {kind!r} item cannot be translated", param=where)
    return messages


_SEPARATOR = "__"  # a namespace's function, as one chat function: "crm__find_customer"


def flat_name(name: str, namespace: Any) -> str:
    return f"{namespace}{_SEPARATOR}{name}" if isinstance(namespace, str) and namespace else name


def namespaced(request: ResponsesRequest) -> dict[str, tuple[str, str]]:
    """Flat chat function name -> (namespace, function name), for the request's namespace tools."""
    found: dict[str, tuple[str, str]] = {}
    for tool in request.obj.get("tools") or []:
        if isinstance(tool, dict) and tool.get("type") == "namespace":
            for inner in tool.get("tools") or []:
                if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                    found[flat_name(inner["name"], tool.get("name"))] = (
                        tool["name"],
                        inner["name"],
                    )
    return found


def _chat_tools(tools: Any, crossing: Crossing) -> list[dict[str, Any]]:
    """Function tools, and the functions of namespace tools flattened (`namespace__name`)."""
    out = []
    for i, given in enumerate(want_list(tools, "tools")):
        tool = want_object(given, f"tools[{i}]")
        if tool.get("type") == "namespace":
            namespace = want_string(tool.get("name"), f"tools[{i}].name")
            inner = want_list(tool.get("tools"), f"tools[{i}].tools")
            for j, function in enumerate(inner):
                here = f"tools[{i}].tools[{j}]"
                out += _chat_function(want_object(function, here), here, crossing, namespace)
            continue
        out += _chat_function(tool, f"tools[{i}]", crossing)
    return out


def _chat_function(
    tool: dict[str, Any], where: str, crossing: Crossing, namespace: str | None = None
) -> list[dict[str, Any]]:
    """One function tool as a chat tool ([]: a tool the provider cannot take, dropped)."""
    if tool.get("type") != "function":
        crossing.cannot(
            f"'{where}': the {tool.get('type')!r} tool cannot be translated (only function tools)",
            where,
        )
        return []
    name = flat_name(want_string(tool.get("name"), f"{where}.name"), namespace)
    function: dict[str, Any] = {"name": name}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    if tool.get("strict") is not None:
        function["strict"] = bool(tool["strict"])
    return [{"type": "function", "function": function}]


def _tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    choice = want_object(choice, "tool_choice")
    if choice.get("type") == "function":
        name = want_string(choice.get("name"), "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    raise Untranslatable("'tool_choice' of this type cannot be translated", param="tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = want_object(text or {}, "text").get("format")
    if fmt is None:
        return None
    fmt = want_object(fmt, "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema: dict[str, Any] = {"name": fmt.get("name") or "output",
                                  "schema": fmt.get("schema") or {}}  # fmt: skip
        if fmt.get("strict") is not None:
            schema["strict"] = bool(fmt["strict"])
        return {"type": "json_schema", "json_schema": schema}
    raise Untranslatable(f"'text.format' {kind!r} cannot be translated", param="text.format")


def to_chat(request: ResponsesRequest, crossing: Crossing) -> dict[str, Any]:
    """The chat completion request (an object, `model` to be set) a Responses request becomes."""
    obj = request.obj
    for key, value in obj.items():
        if key not in _TAKEN and value is not None:
            crossing.cannot(f"'{key}' cannot be translated for a chat completions provider", key)
    out: dict[str, Any] = {"model": request.model}
    out["messages"] = _chat_messages(obj, request.conversation.items)
    _sampling(obj, out, crossing)
    tools = _chat_tools(obj.get("tools") or [], crossing)
    if tools:
        out["tools"] = tools
        if obj.get("tool_choice") is not None:
            out["tool_choice"] = _tool_choice(obj["tool_choice"])
        if obj.get("parallel_tool_calls") is not None:
            out["parallel_tool_calls"] = obj["parallel_tool_calls"]
    response_format = _response_format(obj.get("text"))
    if response_format is not None:
        out["response_format"] = response_format
    if isinstance(obj.get("user"), str):
        out["user"] = obj["user"]
    if request.stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _sampling(obj: dict[str, Any], out: dict[str, Any], crossing: Crossing) -> None:
    """max_output_tokens, temperature and top_p; for a reasoning model (which takes
    max_completion_tokens and no sampling knobs), reasoning.effort."""
    if obj.get("max_output_tokens") is not None:
        key = "max_completion_tokens" if crossing.reasoning else "max_tokens"
        out[key] = obj["max_output_tokens"]
    if not crossing.reasoning:
        for key in ("temperature", "top_p"):
            if obj.get(key) is not None:
                out[key] = obj[key]
    effort = want_object(obj.get("reasoning") or {}, "reasoning").get("effort")
    if crossing.reasoning and isinstance(effort, str):
        out["reasoning_effort"] = effort


def chat_body(request: ResponsesRequest, model: str, crossing: Crossing) -> bytes:
    return json.dumps({**to_chat(request, crossing), "model": model}).encode()


# --- answers: chat completion -> response ---------------------------------------------------------


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_object(
    request: ResponsesRequest,
    model: str,
    output: list[dict[str, Any]],
    status: str,
    usage: dict[str, Any] | None,
    finish: str | None = None,
) -> dict[str, Any]:
    """The `response` object, the request's parameters echoed as OpenAI does."""
    obj = request.obj
    reason = _INCOMPLETE.get(finish or "")
    if status == "completed" and reason is not None:
        status = "incomplete"
    text = obj.get("text") if isinstance(obj.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": request.conversation.id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": reason} if status == "incomplete" else None,
        "instructions": obj.get("instructions"),
        "max_output_tokens": obj.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": obj.get("parallel_tool_calls", True),
        "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": None, "summary": None, **(obj.get("reasoning") or {})},
        "store": request.store,
        "temperature": obj.get("temperature", 1.0),
        "text": text,
        "tool_choice": obj.get("tool_choice", "auto"),
        "tools": obj.get("tools") or [],
        "top_p": obj.get("top_p", 1.0),
        "truncation": obj.get("truncation", "disabled"),
        "usage": usage,
        "user": obj.get("user"),
        "metadata": obj.get("metadata") or {},
    }


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": _item_id("msg"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _call_item(
    call_id: str,
    name: str,
    arguments: str,
    names: dict[str, tuple[str, str]],
    status: str = "completed",
) -> dict[str, Any]:
    """A function_call item; a namespace's function gets its own name back, and `namespace`."""
    item = {"type": "function_call", "id": _item_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}  # fmt: skip
    if name in names:
        item["namespace"], item["name"] = names[name]
    return item


def from_chat_answer(request: ResponsesRequest, body: bytes) -> bytes:
    """A chat completion, as the `response` (kept on the request's conversation, to store)."""
    answer = json.loads(body)
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(_message_item(message["content"]))
    names = namespaced(request)
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(
            _call_item(
                str(call.get("id")), function.get("name", ""), function.get("arguments", ""), names
            )
        )
    response = response_object(
        request,
        answer.get("model") or request.model,
        output,
        "completed",
        _usage(answer.get("usage")),
        choice.get("finish_reason"),
    )
    request.conversation.final = response
    return json.dumps(response).encode()


# --- streams: chat chunks -> response events ------------------------------------------------------


class ChatToResponsesStream:
    """A Responses client's stream from chat completion chunks (an OpenAI upstream's, or those an
    Anthropic upstream's events were translated to)."""

    def __init__(self, request: ResponsesRequest) -> None:
        self._request = request
        self._filter = openai.StreamFilter()
        self._seq = 0
        self._started = False
        self._model = request.model
        self._items: list[dict[str, Any]] = []  # done items, in order
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool index -> its item
        self._held: list[dict[str, Any]] = []  # calls begun while another was open
        self._usage: dict[str, Any] | None = None
        self._finish: str | None = None
        self._names = namespaced(request)

    @property
    def done(self) -> bool:
        return self._filter.done

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"

    def _response(self, status: str) -> dict[str, Any]:
        output = [*self._items] if status != "in_progress" else []
        return response_object(self._request, self._model, output, status, self._usage,
                               self._finish)  # fmt: skip

    def _start(self, out: list[bytes]) -> None:
        self._started = True
        response = self._response("in_progress")
        out.append(self._event("response.created", {"response": response}))
        out.append(self._event("response.in_progress", {"response": response}))

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        chunks: list[dict[str, Any]] = []
        _, error = self._filter.check(tuple(events), chunks)  # each event parsed once
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        for chunk in chunks:
            self._chunk(chunk, out)
        message = None if error is None else str(error.get("message", "upstream error"))
        return b"".join(out), message

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        self._model = chunk.get("model") or self._model
        if chunk.get("usage"):
            self._usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text(delta["content"], out)
            for call in delta.get("tool_calls") or []:
                self._call(call, out)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    def _index(self) -> int:
        return len(self._items)

    def _text(self, text: str, out: list[bytes]) -> None:
        if self._open is None or self._open["type"] != "message":
            self._flush(out)
            item = _message_item("", "in_progress")
            item["content"] = []
            self._open = item
            out.append(self._event("response.output_item.added",
                                   {"output_index": self._index(), "item": item}))  # fmt: skip
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self._event("response.content_part.added", {
                "item_id": item["id"], "output_index": self._index(), "content_index": 0,
                "part": part}))  # fmt: skip
            item["content"] = [part]
        part = self._open["content"][0]
        part["text"] += text
        out.append(self._event("response.output_text.delta", {
            "item_id": self._open["id"], "output_index": self._index(), "content_index": 0,
            "delta": text, "logprobs": []}))  # fmt: skip

    def _call(self, call: dict[str, Any], out: list[bytes]) -> None:
        """A tool call's delta. The first call streams as it comes; a call that begins while
        another is open is held (its arguments gathered) until that one ends: a chat stream may
        interleave calls, a Responses stream never interleaves items."""
        index = int(call.get("index") or 0)
        function = call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            if not call.get("id"):
                return  # arguments for a call that never began: nothing to attach them to
            item = self._calls[index] = _call_item(
                str(call["id"]), function.get("name") or "", "", self._names, "in_progress"
            )
            if self._open is None or self._open["type"] == "message":
                self._begin(item, out)
            else:
                self._held.append(item)
        arguments = function.get("arguments") or ""
        if not arguments:
            return
        if item is self._open:
            self._arguments(item, arguments, out)
        else:
            item["arguments"] += arguments  # held: sent whole when its turn comes

    def _begin(self, item: dict[str, Any], out: list[bytes]) -> None:
        """Open a function_call item (closing the item before it)."""
        self._close(out)
        self._open = item
        held, item["arguments"] = item["arguments"], ""
        out.append(self._event("response.output_item.added",
                               {"output_index": self._index(), "item": {**item}}))  # fmt: skip
        if held:
            self._arguments(item, held, out)

    def _flush(self, out: list[bytes]) -> None:
        """Close the open item, then send the held calls, each whole, in order."""
        self._close(out)
        while self._held:
            self._begin(self._held.pop(0), out)
            self._close(out)

    def _arguments(self, item: dict[str, Any], delta: str, out: list[bytes]) -> None:
        item["arguments"] += delta
        out.append(self._event("response.function_call_arguments.delta", {
            "item_id": item["id"], "output_index": self._index(), "delta": delta}))  # fmt: skip

    def _close(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        index = self._index()
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._event("response.output_text.done", {
                "item_id": item["id"], "output_index": index, "content_index": 0,
                "text": part["text"], "logprobs": []}))  # fmt: skip
            out.append(self._event("response.content_part.done", {
                "item_id": item["id"], "output_index": index, "content_index": 0,
                "part": part}))  # fmt: skip
        else:
            out.append(self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "name": item["name"],
                "arguments": item["arguments"]}))  # fmt: skip
        item["status"] = "completed"
        out.append(self._event("response.output_item.done", {"output_index": index,
                                                              "item": item}))  # fmt: skip
        self._items.append(item)

    def finish(self) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        self._flush(out)
        response = self._response("completed")
        self._request.conversation.final = response
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, {"response": response}))
        return b"".join(out)

    def fail(self, message: str, code: str) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        response = self._response("failed")
        response["error"] = {"code": _error_code(code), "message": message}
        out.append(self._event("response.failed", {"response": response}))
        return b"".join(out)


def _error_code(code: str) -> str:
    """Cascade's error codes as the ones Responses clients (Codex) act on."""
    if code in ("rate_limit_exceeded", "retry_exhausted"):
        return "rate_limit_exceeded"
    if code == "context_length_exceeded":
        return code
    return "server_error"


class ViaChat:
    """A Responses stream from another dialect's upstream: that upstream's events become chat
    chunks (its pair's translator), and those the Responses events."""

    def __init__(self, inner: StreamWriter, request: ResponsesRequest) -> None:
        self._inner = inner
        self._decoder = SSEDecoder()
        self._outer = ChatToResponsesStream(request)

    @property
    def done(self) -> bool:
        return self._inner.done

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        data, error = self._inner.relay(events)
        out, outer_error = self._outer.relay(self._decoder.feed(data))
        return out, error or outer_error

    def finish(self) -> bytes:
        out, _ = self._outer.relay(self._decoder.feed(self._inner.finish()))
        return out + self._outer.finish()

    def fail(self, message: str, code: str) -> bytes:
        return self._outer.fail(message, code)


# --- a provider that speaks the Responses API natively ------------------------------------------

_INPUT_TOKENS = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_OUTPUT_TOKENS = re.compile(rb'"output_tokens"\s*:\s*(\d+)')
_CACHED_TOKENS = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
_ENDS = (b"response.completed", b"response.incomplete")
_FAILS = ("error", "response.failed")


def _event_type(event: SSEEvent, parsed: dict[str, Any] | None = None) -> str | None:
    if event.event:
        return event.event.decode(errors="replace")
    return parsed.get("type") if parsed is not None else None


class Wire:
    """The upstream side of a native Responses provider (actors/wire.py): Bearer auth, usage."""

    fixed_headers: Mapping[str, str] = {}

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def tokens(self, body: bytes) -> int | None:
        usage = self.usage(body)
        return usage.total if usage is not None else None

    def usage(self, body: bytes) -> Usage | None:
        start = body.rfind(b'"usage"')
        if start < 0:
            return None
        found = _INPUT_TOKENS.search(body, start)
        if found is None:
            return None
        output = _OUTPUT_TOKENS.search(body, start)
        cached = _CACHED_TOKENS.search(body, start)
        return Usage(
            int(found.group(1)),
            int(output.group(1)) if output else 0,
            int(cached.group(1)) if cached else 0,
        )

    def stream_tally(self) -> _Tally:
        return _Tally(self)


class _Tally:
    """A native stream is complete once `response.completed` (or `.incomplete`) has passed; that
    event's response carries the usage."""

    __slots__ = ("_wire", "complete", "usage")

    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self.usage: Usage | None = None
        self.complete = False

    def feed(self, events: Sequence[SSEEvent]) -> None:
        for event in events:
            if event.event in _ENDS or (
                event.event is None and (b'"response.completed"' in event.data
                                         or b'"response.incomplete"' in event.data)
            ):  # fmt: skip
                self.complete = True
                self.usage = self._wire.usage(event.data)


WIRE = Wire()


def _frame(event: SSEEvent) -> bytes:
    head = b"event: " + event.event + b"\n" if event.event else b""
    return head + b"data: " + event.data + b"\n\n"


def native_check_start(events: tuple[SSEEvent, ...]) -> Failure | None:
    """Before commit: a native stream that opens with an error, or with garbage, is a failure."""
    for event in events:
        parsed = event_object(event.data)
        if parsed is None:
            continue
        if _event_type(event, parsed) in _FAILS:
            error = parsed.get("error") or (parsed.get("response") or {}).get("error") or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            return Failure(Kind.PROTOCOL, "stream_error", str(message or "in-band error"))
        return None
    return Failure(Kind.PROTOCOL, "malformed_stream", "the stream opened with no valid event")


class NativeStream:
    """A Responses client's stream from a native provider: its events relayed as they are
    (malformed ones dropped); its `response.completed` kept (to store); a failure after the
    start ends with a `response.failed` numbered after the provider's last event."""

    def __init__(self, request: ResponsesRequest) -> None:
        self._request = request
        self.done = False
        self._seq = -1
        self._response: dict[str, Any] = {"id": request.conversation.id}

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        out: list[bytes] = []
        for event in events:
            parsed = event_object(event.data)
            if parsed is None:
                continue
            kind = _event_type(event, parsed)
            if kind in _FAILS:
                error = parsed.get("error") or (parsed.get("response") or {}).get("error") or {}
                message = error.get("message") if isinstance(error, dict) else str(error)
                return b"".join(out), str(message or "upstream error")
            if isinstance(parsed.get("sequence_number"), int):
                self._seq = parsed["sequence_number"]
            if isinstance(parsed.get("response"), dict):
                self._response = parsed["response"]
            out.append(_frame(event))
            if kind in ("response.completed", "response.incomplete"):
                self.done = True
                self._request.conversation.final = self._response
                break
        return b"".join(out), None

    def finish(self) -> bytes:
        return b""  # the provider's own end has been relayed

    def fail(self, message: str, code: str) -> bytes:
        self._seq += 1
        response = {**self._response, "status": "failed",
                    "error": {"code": _error_code(code), "message": message}}  # fmt: skip
        event = {"type": "response.failed", "sequence_number": self._seq, "response": response}
        return b"event: response.failed\ndata: " + dumps(event) + b"\n\n"


_CONTENT = content_counter("delta")  # a stream's content, in its events


class Responses:
    """The Responses dialect (router/dialects/base.py `Dialect`): as a client face, served by
    chat completions and messages providers (translated) and by native ones (as it is); as a
    provider dialect, a provider that speaks only the Responses API."""

    name = "responses"
    client_path = "/v1/responses"
    upstream_path = PATH
    forwarded_headers: tuple[bytes, ...] = ()
    input_at_start = False

    def parse(self, body: bytes) -> ResponsesRequest:
        return parse_responses_request(body)

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
        return openai.error_body(message, type, code, param, **extra)

    def stream_writer(self, request: Any) -> StreamWriter:
        assert isinstance(request, ResponsesRequest)
        return NativeStream(request)

    def answered(self, request: Any, body: bytes) -> None:
        """A native provider's whole answer, relayed as it is: kept, to store."""
        assert isinstance(request, ResponsesRequest)
        answer = event_object(body)
        if answer is not None and isinstance(answer.get("id"), str):
            request.conversation.final = answer

    def content_chars(self, events: Sequence[SSEEvent]) -> int:
        return count_content(_CONTENT, events)

    def check_start(self, events: tuple[SSEEvent, ...]) -> Failure | None:
        return native_check_start(events)

    def wire(self, provider: ProviderConfig) -> Wire:
        return WIRE


DIALECT = Responses()
