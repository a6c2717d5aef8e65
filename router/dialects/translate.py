"""Translation between the OpenAI and Anthropic dialects: requests, answers and streams.

Used only when a request's dialect and the serving provider's differ; a same-dialect attempt
never comes here. What one dialect can say and the other cannot is a 400 naming the field,
never a silent drop, with two documented exceptions: thinking blocks in a conversation's history
are dropped when crossing (their signatures are only valid for the provider that made them), and
`pause_turn` / `refusal` / `model_context_window_exceeded` map to the nearest finish reason
(docs/dialects.md has the tables).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from actors.sse import SSEEvent
from router.errors import RequestError

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; an OpenAI client may omit it

_ANTHROPIC_ID = re.compile(r"^[A-Za-z0-9_-]+$")

# --- tool-call ids --------------------------------------------------------------------------------


def anthropic_tool_id(openai_id: str) -> str:
    """An id Anthropic accepts (^[a-zA-Z0-9_-]+$), the same every time for the same OpenAI id,
    so a conversation that moved providers still matches its tool results to its tool calls."""
    if _ANTHROPIC_ID.match(openai_id):
        return openai_id
    return "cx_" + openai_id.encode().hex()


def openai_tool_id(anthropic_id: str) -> str:
    """The inverse of `anthropic_tool_id` (an id Cascade encoded comes back as it was)."""
    if anthropic_id.startswith("cx_"):
        try:
            return bytes.fromhex(anthropic_id[3:]).decode()
        except ValueError:
            pass
    return anthropic_id


# --- stop reasons -----------------------------------------------------------------------------------

FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",  # a paused server-tool turn: the client may continue it
    "refusal": "content_filter",
    "model_context_window_exceeded": "length",
}

# --- requests: OpenAI -> Anthropic ---------------------------------------------------------------------

_OPENAI_PASSED = {"model", "messages", "stream", "stream_options", "max_tokens",
                  "max_completion_tokens", "temperature", "top_p", "stop", "tools", "tool_choice",
                  "parallel_tool_calls", "user", "metadata", "n"}  # fmt: skip


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError(f"'{where}[{i}]': only text can be said here", param=where)
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    if content is None:
        return ""
    raise RequestError(f"'{where}' must be a string or a list of parts", param=where)


def _image_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = str((part.get("image_url") or {}).get("url", ""))
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media_type = head[len("data:") :].split(";")[0]
        if ";base64" not in head or not media_type:
            raise RequestError(
                f"'{where}': a data URL must be base64 with a media type", param=where
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise RequestError(f"'{where}': an image must be an http(s) or data URL", param=where)


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"'{where}' must be a string or a list of parts", param=where)
    blocks = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{where}[{i}]"))
        else:
            raise RequestError(
                f"'{where}[{i}]': a {kind!r} part cannot be sent to an Anthropic provider",
                param=f"{where}[{i}]",
            )
    return blocks


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Anthropic wants user and assistant turns to alternate: merge consecutive ones."""
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def openai_to_anthropic(obj: dict[str, Any], model: str, default_max_tokens: int) -> bytes:
    for key, value in obj.items():
        if key not in _OPENAI_PASSED and value is not None:
            raise RequestError(f"'{key}' cannot be translated for an Anthropic provider", param=key)
    if (obj.get("n") or 1) != 1:
        raise RequestError("'n' above 1 cannot be translated for an Anthropic provider", param="n")
    out: dict[str, Any] = {"model": model}
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(obj["messages"]):
        where = f"messages[{i}]"
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content"), f"{where}.content"))
        elif role == "user":
            _append(messages, "user", _user_blocks(message.get("content"), f"{where}.content"))
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            text = _text_of(message.get("content"), f"{where}.content")
            if text:
                blocks.append({"type": "text", "text": text})
            for j, call in enumerate(message.get("tool_calls") or []):
                function = call.get("function") or {}
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    raise RequestError(
                        f"'{where}.tool_calls[{j}].function.arguments' is not JSON",
                        param=f"{where}.tool_calls[{j}]",
                    ) from None
                blocks.append({
                    "type": "tool_use",
                    "id": anthropic_tool_id(str(call.get("id", ""))),
                    "name": function.get("name", ""),
                    "input": arguments,
                })  # fmt: skip
            _append(messages, "assistant", blocks or [{"type": "text", "text": ""}])
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": anthropic_tool_id(str(message.get("tool_call_id", ""))),
                "content": _text_of(message.get("content"), f"{where}.content"),
            }
            _append(messages, "user", [result])
        else:
            raise RequestError(f"'{where}.role' {role!r} cannot be translated", param=where)
    if system:
        out["system"] = "\n\n".join(system)
    out["messages"] = messages
    out["max_tokens"] = (
        obj.get("max_completion_tokens") or obj.get("max_tokens") or default_max_tokens
    )
    if obj.get("temperature") is not None:
        if obj["temperature"] > 1:
            raise RequestError(
                "'temperature' above 1 cannot be said to an Anthropic provider (its range is 0-1)",
                param="temperature",
            )
        out["temperature"] = obj["temperature"]
    if obj.get("top_p") is not None:
        out["top_p"] = obj["top_p"]
    stop = obj.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if obj.get("tools"):
        tools = []
        for i, tool in enumerate(obj["tools"]):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise RequestError(f"'tools[{i}]': only function tools", param=f"tools[{i}]")
            function = tool.get("function") or {}
            entry = {
                "name": function.get("name", ""),
                "input_schema": function.get("parameters") or {"type": "object"},
            }
            if function.get("description"):
                entry["description"] = function["description"]
            tools.append(entry)
        out["tools"] = tools
    choice = obj.get("tool_choice")
    translated: dict[str, Any] | None = None
    if choice == "auto":
        translated = {"type": "auto"}
    elif choice == "required":
        translated = {"type": "any"}
    elif choice == "none":
        translated = {"type": "none"}
    elif isinstance(choice, dict):
        translated = {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    if obj.get("parallel_tool_calls") is False:
        translated = {**(translated or {"type": "auto"}), "disable_parallel_tool_use": True}
    if translated is not None:
        out["tool_choice"] = translated
    if obj.get("user"):
        out["metadata"] = {"user_id": str(obj["user"])}
    if obj.get("stream"):
        out["stream"] = True
    return json.dumps(out).encode()


# --- requests: Anthropic -> OpenAI ---------------------------------------------------------------------

_ANTHROPIC_PASSED = {"model", "messages", "system", "max_tokens", "stream", "temperature", "top_p",
                     "stop_sequences", "tools", "tool_choice", "metadata"}  # fmt: skip


def _openai_parts(
    blocks: list[Any], where: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A user turn's blocks as (OpenAI content parts, tool messages before them)."""
    parts: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        here = f"{where}[{i}]"
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            source = block.get("source") or {}
            if source.get("type") == "base64":
                url = f"data:{source.get('media_type')};base64,{source.get('data')}"
            elif source.get("type") == "url":
                url = str(source.get("url"))
            else:
                raise RequestError(f"'{here}': this image source cannot be translated", param=here)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_result":
            content = block.get("content")
            text = (
                content if isinstance(content, str) else _text_of(content or [], here + ".content")
            )
            if block.get("is_error"):
                text = f"[error] {text}"
            tools.append({
                "role": "tool",
                "tool_call_id": openai_tool_id(str(block.get("tool_use_id", ""))),
                "content": text,
            })  # fmt: skip
        elif kind in ("thinking", "redacted_thinking"):
            continue  # signed for the provider that made it: dropped when crossing dialects
        else:
            raise RequestError(
                f"'{here}': a {kind!r} block cannot be sent to an OpenAI provider", param=here
            )
    return parts, tools


def anthropic_to_openai(obj: dict[str, Any], model: str, stream: bool) -> bytes:
    for key, value in obj.items():
        if key not in _ANTHROPIC_PASSED and value is not None:
            raise RequestError(f"'{key}' cannot be translated for an OpenAI provider", param=key)
    messages: list[dict[str, Any]] = []
    system = obj.get("system")
    if system:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    for i, message in enumerate(obj["messages"]):
        where = f"messages[{i}].content"
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if message["role"] == "user":
            parts, tool_messages = _openai_parts(blocks, where)
            messages.extend(tool_messages)
            if parts:
                messages.append({"role": "user", "content": parts})
        else:
            texts: list[str] = []
            calls: list[dict[str, Any]] = []
            for j, block in enumerate(blocks):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "text":
                    texts.append(str(block.get("text", "")))
                elif kind == "tool_use":
                    calls.append({
                        "id": openai_tool_id(str(block.get("id", ""))),
                        "type": "function",
                        "function": {
                            "name": block.get("name", ""),
                            "arguments": json.dumps(block.get("input") or {}),
                        },
                    })  # fmt: skip
                elif kind in ("thinking", "redacted_thinking"):
                    continue  # see above
                else:
                    raise RequestError(
                        f"'{where}[{j}]': a {kind!r} block cannot be sent to an OpenAI provider",
                        param=f"{where}[{j}]",
                    )
            turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
            if calls:
                turn["tool_calls"] = calls
            messages.append(turn)
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": obj["max_tokens"]}
    for key in ("temperature", "top_p"):
        if obj.get(key) is not None:
            out[key] = obj[key]
    if obj.get("stop_sequences"):
        out["stop"] = list(obj["stop_sequences"])
    if obj.get("tools"):
        tools = []
        for i, tool in enumerate(obj["tools"]):
            if not isinstance(tool, dict) or "input_schema" not in tool:
                raise RequestError(
                    f"'tools[{i}]': only custom tools (with input_schema) can be translated",
                    param=f"tools[{i}]",
                )
            function = {"name": tool.get("name", ""), "parameters": tool["input_schema"]}
            if tool.get("description"):
                function["description"] = tool["description"]
            tools.append({"type": "function", "function": function})
        out["tools"] = tools
    choice = obj.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        simple = {"auto": "auto", "any": "required", "none": "none"}
        out["tool_choice"] = simple.get(str(kind)) or {
            "type": "function",
            "function": {"name": choice.get("name", "")},
        }
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    user = (obj.get("metadata") or {}).get("user_id")
    if user:
        out["user"] = str(user)
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # message_delta needs the usage
    return json.dumps(out).encode()


# --- answers ------------------------------------------------------------------------------------------


def openai_usage_to_anthropic(usage: dict[str, Any] | None) -> dict[str, int]:
    """OpenAI's prompt_tokens include cached tokens; Anthropic's input_tokens do not."""
    usage = usage or {}
    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    return {
        "input_tokens": int(usage.get("prompt_tokens") or 0) - cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def anthropic_usage_to_openai(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + read + written
    completion = int(usage.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read},
    }


def openai_answer_to_anthropic(body: bytes) -> bytes:
    answer = json.loads(body)
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {"_unparsed_arguments": function.get("arguments")}
        content.append({
            "type": "tool_use",
            "id": anthropic_tool_id(str(call.get("id", ""))),
            "name": function.get("name", ""),
            "input": arguments,
        })  # fmt: skip
    out = {
        "id": "msg_" + str(answer.get("id", "")).replace("chatcmpl-", ""),
        "type": "message",
        "role": "assistant",
        "model": answer.get("model"),
        "content": content,
        "stop_reason": FINISH_TO_STOP.get(choice.get("finish_reason") or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": openai_usage_to_anthropic(answer.get("usage")),
    }
    return json.dumps(out).encode()


def anthropic_answer_to_openai(body: bytes) -> bytes:
    answer = json.loads(body)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in answer.get("content") or []:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append({
                "id": openai_tool_id(str(block.get("id", ""))),
                "type": "function",
                "function": {"name": block.get("name", ""), "arguments": json.dumps(block.get("input") or {})},
            })  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    out = {
        "id": "chatcmpl-" + str(answer.get("id", "")),
        "object": "chat.completion",
        "created": 0,
        "model": answer.get("model"),
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": STOP_TO_FINISH.get(answer.get("stop_reason") or "end_turn", "stop"),
        }],
        "usage": anthropic_usage_to_openai(answer.get("usage")),
    }  # fmt: skip
    return json.dumps(out).encode()


# --- streams --------------------------------------------------------------------------------------------


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj).encode() + b"\n\n"


class OpenAIToAnthropicStream:
    """An Anthropic client's stream from an OpenAI upstream's chunks, event by event.

    OpenAI's `tool_calls[index]` is the call's position among tool calls; each becomes its own
    Anthropic content block, numbered after the blocks before it."""

    def __init__(self) -> None:
        self.done = False
        self._started = False
        self._block: int | None = None  # the open content block's index
        self._blocks = 0
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool index -> block index
        self._block_kind: str | None = None
        self._stop_reason = "end_turn"
        self._usage: dict[str, int] = {"output_tokens": 0}

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._block, self._block_kind = self._blocks, kind
        self._blocks += 1
        event = {"type": "content_block_start", "index": self._block, "content_block": block}
        return out + _sse(event, "content_block_start")

    def _close(self) -> bytes:
        if self._block is None:
            return b""
        index, self._block, self._block_kind = self._block, None, None
        return _sse({"type": "content_block_stop", "index": index}, "content_block_stop")

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        out: list[bytes] = []
        for event in events:
            if event.data == b"[DONE]":
                out.append(self._end())
                break
            try:
                chunk = json.loads(event.data)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                error = chunk["error"]
                return b"".join(out), str(
                    error.get("message") if isinstance(error, dict) else error
                )
            if not self._started:
                self._started = True
                message: dict[str, Any] = {
                    "id": "msg_" + str(chunk.get("id", "")).replace("chatcmpl-", ""),
                    "type": "message", "role": "assistant", "model": chunk.get("model"),
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }  # fmt: skip
                out.append(_sse({"type": "message_start", "message": message}, "message_start"))
            if chunk.get("usage"):
                self._usage = openai_usage_to_anthropic(chunk["usage"])
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    if self._block_kind != "text":
                        out.append(self._open("text", {"type": "text", "text": ""}))
                    text = {"type": "text_delta", "text": delta["content"]}
                    out.append(self._delta(text))
                for call in delta.get("tool_calls") or []:
                    out.append(self._tool_delta(call))
                if choice.get("finish_reason"):
                    self._stop_reason = FINISH_TO_STOP.get(choice["finish_reason"], "end_turn")
        return b"".join(out), None

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        event = {"type": "content_block_delta", "index": self._block if index is None else index,
                 "delta": delta}  # fmt: skip
        return _sse(event, "content_block_delta")

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        position = int(call.get("index", 0))
        function = call.get("function") or {}
        if position not in self._tool_blocks:
            block = {
                "type": "tool_use",
                "id": anthropic_tool_id(str(call.get("id", f"call_{position}"))),
                "name": function.get("name", ""),
                "input": {},
            }
            out += self._open("tool", block)
            assert self._block is not None
            self._tool_blocks[position] = self._block
        arguments = function.get("arguments")
        if arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out += self._delta(delta, self._tool_blocks[position])
        return out

    def _end(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        out = self._close()
        delta = {"stop_reason": self._stop_reason, "stop_sequence": None}
        event = {"type": "message_delta", "delta": delta, "usage": self._usage}
        out += _sse(event, "message_delta")
        return out + _sse({"type": "message_stop"}, "message_stop")

    def finish(self) -> bytes:
        return self._end()

    def fail(self, message: str, code: str) -> bytes:
        error = {"type": "error", "error": {"type": "api_error", "message": f"{message} ({code})"}}
        return _sse(error, "error")


class AnthropicToOpenAIStream:
    """An OpenAI client's stream from an Anthropic upstream's events, event by event. Thinking
    deltas are dropped; a usage chunk is sent only when the client asked for one."""

    def __init__(self, include_usage: bool) -> None:
        self.done = False
        self._include_usage = include_usage
        self._id = "chatcmpl-cascade"
        self._model: Any = None
        self._tools: dict[int, int] = {}  # block index -> OpenAI tool position
        self._usage: dict[str, Any] = {}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": self._id, "object": "chat.completion.chunk", "created": 0,
                 "model": self._model, "choices": [{"index": 0, "delta": delta,
                                                    "finish_reason": finish}]}  # fmt: skip
        return _sse(chunk)

    def relay(self, events: Sequence[SSEEvent]) -> tuple[bytes, str | None]:
        out: list[bytes] = []
        for event in events:
            try:
                data = json.loads(event.data)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            kind = data.get("type")
            if event.event == b"error" or kind == "error":
                error = data.get("error") or {}
                return b"".join(out), str(error.get("message", "upstream error"))
            if kind == "message_start":
                message: dict[str, Any] = data.get("message") or {}
                self._id = "chatcmpl-" + str(message.get("id", ""))
                self._model = message.get("model")
                self._usage = dict(message.get("usage") or {})
                out.append(self._chunk({"role": "assistant", "content": ""}))
            elif kind == "content_block_start":
                block = data.get("content_block") or {}
                if block.get("type") == "tool_use":
                    position = self._tools[data.get("index", 0)] = len(self._tools)
                    call = {"index": position, "id": openai_tool_id(str(block.get("id", ""))),
                            "type": "function",
                            "function": {"name": block.get("name", ""), "arguments": ""}}  # fmt: skip
                    out.append(self._chunk({"tool_calls": [call]}))
            elif kind == "content_block_delta":
                delta = data.get("delta") or {}
                if delta.get("type") == "text_delta":
                    out.append(self._chunk({"content": delta.get("text", "")}))
                elif delta.get("type") == "input_json_delta":
                    position = self._tools.get(data.get("index", 0), 0)
                    call = {
                        "index": position,
                        "function": {"arguments": delta.get("partial_json", "")},
                    }
                    out.append(self._chunk({"tool_calls": [call]}))
            elif kind == "message_delta":
                self._usage.update(data.get("usage") or {})
                stop = (data.get("delta") or {}).get("stop_reason") or "end_turn"
                out.append(self._chunk({}, STOP_TO_FINISH.get(stop, "stop")))
            elif kind == "message_stop":
                out.append(self._end())
                break
        return b"".join(out), None

    def _end(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        out = b""
        if self._include_usage:
            chunk = {"id": self._id, "object": "chat.completion.chunk", "created": 0,
                     "model": self._model, "choices": [],
                     "usage": anthropic_usage_to_openai(self._usage)}  # fmt: skip
            out += _sse(chunk)
        return out + b"data: [DONE]\n\n"

    def finish(self) -> bytes:
        return self._end()

    def fail(self, message: str, code: str) -> bytes:
        error = {
            "error": {"message": message, "type": "upstream_error", "param": None, "code": code}
        }
        return _sse(error)


def error_message(body: bytes) -> str:
    """The message of a provider's error body, in either dialect's shape."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return "the provider refused the request"
    if isinstance(error, dict):
        return str(error.get("message", "the provider refused the request"))
    return str(error or "the provider refused the request")
