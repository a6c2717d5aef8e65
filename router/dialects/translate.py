"""Translation between the OpenAI and Anthropic dialects: requests, answers and streams.

Used only when a request's dialect and the serving provider's differ; a same-dialect attempt
never comes here. What one dialect can say and the other cannot raises `Untranslatable` naming
the field: the targets of that dialect are skipped for this request, and the route's others
serve it (a 400 only when none can). Fields whose drop keeps the answer's meaning (thinking
configuration and blocks, cache hints, context management, `store`, `seed`, `service_tier`, ...)
are dropped when crossing, and a provider with `drop_params: true` also has the top-level fields
it cannot take dropped instead of being skipped. `pause_turn` / `refusal` /
`model_context_window_exceeded` map to the nearest finish reason. docs/dialects.md has the
tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs

from actors.outcome import INCOMPLETE_STREAM
from actors.sse import SSEEvent
from router.dialects.jsonbody import dumps, event_object, want_list, want_object, want_string
from router.errors import RequestError, Untranslatable

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; an OpenAI client may omit it


@attrs.frozen
class Crossing:
    """What a request's translation depends on besides the request: the provider and model it is
    for. Translations are made once per distinct Crossing (router/dialects/bodies.py)."""

    default_max_tokens: int = DEFAULT_MAX_TOKENS  # (to Anthropic) when the request names none
    drop: bool = False  # the provider's drop_params: drop top-level fields it cannot take
    reasoning: bool = False  # (to OpenAI) a reasoning model: max_completion_tokens, no sampling

    def cannot(self, message: str, param: str) -> None:
        """A top-level field or value the provider cannot take: dropped with `drop`, else the
        target is ineligible (Untranslatable)."""
        if not self.drop:
            raise Untranslatable(message, param=param)


_ANTHROPIC_ID = re.compile(r"^[A-Za-z0-9_-]+\Z")

# --- tool-call ids --------------------------------------------------------------------------------


def anthropic_tool_id(openai_id: str) -> str:
    """An id Anthropic accepts (^[a-zA-Z0-9_-]+$), the same every time for the same OpenAI id,
    so a conversation that moved providers still matches its tool results to its tool calls."""
    if _ANTHROPIC_ID.match(openai_id) and not openai_id.startswith("cx_"):
        return openai_id
    return "cx_" + openai_id.encode().hex()  # (an id that starts cx_ is encoded too: unambiguous)


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
                  "parallel_tool_calls", "user", "n", "response_format"}  # fmt: skip
# Dropped when crossing to Anthropic: hints and bookkeeping with no bearing on the answer's
# meaning (OpenAI's stored-completion metadata, caching and safety keys, the effort of a
# reasoning model, the serving tier, a best-effort seed).
_OPENAI_DROPPED = frozenset({"store", "metadata", "service_tier", "seed", "reasoning_effort",
                             "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
                             "verbosity"})  # fmt: skip


def _text_of(content: Any, where: str) -> str:
    """The text of a string or of a list of text parts (anything else cannot be said here)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                here = f"{where}[{i}]"
                raise Untranslatable(f"'{here}': only text can be said here", param=here)
            texts.append(want_string(part.get("text"), f"{where}[{i}].text"))
        return "".join(texts)
    if content is None:
        return ""
    raise RequestError(f"'{where}' must be a string or a list of parts", param=where)


def _image_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    image = want_object(part.get("image_url"), f"{where}.image_url")
    url = want_string(image.get("url"), f"{where}.image_url.url")
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
    raise Untranslatable(f"'{where}': an image must be an http(s) or data URL", param=where)


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn's content as Anthropic blocks; empty text is left out (Anthropic refuses an
    empty text block, and it says nothing)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise RequestError(f"'{where}' must be a string or a list of parts", param=where)
    blocks = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = want_string(part.get("text"), f"{where}[{i}].text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{where}[{i}]"))
        else:
            raise Untranslatable(
                f"'{where}[{i}]': a {kind!r} part cannot be sent to an Anthropic provider",
                param=f"{where}[{i}]",
            )
    return blocks


def _tool_use_blocks(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls` as Anthropic tool_use blocks."""
    blocks = []
    for j, item in enumerate(want_list(calls, where)):
        here = f"{where}[{j}]"
        call = want_object(item, here)
        function = want_object(call.get("function"), f"{here}.function")
        raw = want_string(function.get("arguments"), f"{here}.function.arguments", "{}")
        try:
            arguments = json.loads(raw or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):  # Anthropic's tool input is an object
            raise RequestError(
                f"'{here}.function.arguments' must be a JSON object in a string",
                param=f"{here}.function.arguments",
            )
        blocks.append({
            "type": "tool_use",
            "id": anthropic_tool_id(want_string(call.get("id"), f"{here}.id")),
            "name": want_string(function.get("name"), f"{here}.function.name"),
            "input": arguments,
        })  # fmt: skip
    return blocks


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Anthropic wants user and assistant turns to alternate: merge consecutive ones. A turn
    with nothing in it is left out (Anthropic refuses empty content)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _anthropic_messages(obj: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, Anthropic messages) of an OpenAI conversation."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(obj["messages"]):
        where = f"messages[{i}]"
        role = message["role"]
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content, f"{where}.content"))
        elif role == "user":
            _append(messages, "user", _user_blocks(content, f"{where}.content"))
        elif role == "assistant":
            text = _text_of(content, f"{where}.content")
            blocks = [{"type": "text", "text": text}] if text else []
            blocks += _tool_use_blocks(message.get("tool_calls"), f"{where}.tool_calls")
            _append(messages, "assistant", blocks)
        elif role == "tool":
            call_id = want_string(message.get("tool_call_id"), f"{where}.tool_call_id")
            result = {
                "type": "tool_result",
                "tool_use_id": anthropic_tool_id(call_id),
                "content": _text_of(content, f"{where}.content"),
            }
            _append(messages, "user", [result])
        else:
            raise Untranslatable(f"'{where}.role' {role!r} cannot be translated", param=where)
    if not messages:
        raise Untranslatable(
            "'messages' has no user or assistant content: an Anthropic provider needs some",
            param="messages",
        )
    return system, messages


def _anthropic_tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(want_list(tools, "tools")):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise Untranslatable(f"'tools[{i}]': only function tools", param=f"tools[{i}]")
        function = want_object(tool.get("function"), f"tools[{i}].function")
        schema = function.get("parameters")
        entry = {
            "name": want_string(function.get("name"), f"tools[{i}].function.name"),
            "input_schema": {"type": "object"}
            if schema is None
            else want_object(schema, f"tools[{i}].function.parameters"),
        }
        description = want_string(function.get("description"), f"tools[{i}].function.description")
        if description:
            entry["description"] = description
        out.append(entry)
    return out


def _anthropic_tool_choice(obj: dict[str, Any]) -> dict[str, Any] | None:
    choice = obj.get("tool_choice")
    translated: dict[str, Any] | None = None
    if isinstance(choice, str):
        simple = {"auto": "auto", "required": "any", "none": "none"}
        if choice not in simple:
            raise RequestError(
                "'tool_choice' must be 'auto', 'required', 'none' or an object",
                param="tool_choice",
            )
        translated = {"type": simple[choice]}
    elif choice is not None:
        function = want_object(
            want_object(choice, "tool_choice").get("function"), "tool_choice.function"
        )
        name = want_string(function.get("name"), "tool_choice.function.name")
        translated = {"type": "tool", "name": name}
    if obj.get("parallel_tool_calls") is False:
        translated = {**(translated or {"type": "auto"}), "disable_parallel_tool_use": True}
    return translated


def _anthropic_can_take(obj: dict[str, Any], crossing: Crossing) -> None:
    """The top-level fields and values an Anthropic provider has no equivalent for."""
    for key, value in obj.items():
        if key not in _OPENAI_PASSED and key not in _OPENAI_DROPPED and value is not None:
            crossing.cannot(f"'{key}' cannot be translated for an Anthropic provider", key)
    if (obj.get("n") or 1) != 1:
        crossing.cannot("'n' above 1 cannot be translated for an Anthropic provider", "n")
    response_format = obj.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        crossing.cannot(
            "'response_format' (structured output) cannot be translated for an Anthropic provider",
            "response_format",
        )


def openai_to_anthropic(obj: dict[str, Any], model: str, crossing: Crossing) -> bytes:
    _anthropic_can_take(obj, crossing)
    default_max_tokens = crossing.default_max_tokens
    out: dict[str, Any] = {"model": model}
    system, messages = _anthropic_messages(obj)
    if system:
        out["system"] = "\n\n".join(system)
    out["messages"] = messages
    out["max_tokens"] = (
        obj.get("max_completion_tokens") or obj.get("max_tokens") or default_max_tokens
    )
    _anthropic_sampling(obj, out, crossing)
    if obj.get("tools"):
        out["tools"] = _anthropic_tools(obj["tools"])
    choice = _anthropic_tool_choice(obj)
    if choice is not None:
        out["tool_choice"] = choice
    if obj.get("user"):
        out["metadata"] = {"user_id": obj["user"]}
    if obj.get("stream"):
        out["stream"] = True
    return json.dumps(out).encode()


def _anthropic_sampling(obj: dict[str, Any], out: dict[str, Any], crossing: Crossing) -> None:
    """temperature (Anthropic's range is 0-1), top_p and stop sequences."""
    if obj.get("temperature") is not None:
        if obj["temperature"] > 1:
            crossing.cannot(
                "'temperature' above 1 cannot be said to an Anthropic provider (its range is 0-1)",
                "temperature",
            )
        else:
            out["temperature"] = obj["temperature"]
    if obj.get("top_p") is not None:
        out["top_p"] = obj["top_p"]
    stop = obj.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)


# --- requests: Anthropic -> OpenAI ---------------------------------------------------------------------

_ANTHROPIC_PASSED = {"model", "messages", "system", "max_tokens", "stream", "temperature", "top_p",
                     "stop_sequences", "tools", "tool_choice", "metadata", "output_config"}  # fmt: skip
# Dropped when crossing to OpenAI: extended thinking's configuration (its blocks are dropped
# too), context editing, cache hints and the serving tier; none changes what the answer says.
_ANTHROPIC_DROPPED = frozenset({"thinking", "context_management", "service_tier",
                                "cache_control"})  # fmt: skip
_EFFORTS = frozenset({"minimal", "low", "medium", "high"})  # what OpenAI's reasoning_effort takes


def _image_url(block: dict[str, Any], where: str) -> str:
    source = want_object(block.get("source"), f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        media_type = want_string(source.get("media_type"), f"{where}.source.media_type")
        data = want_string(source.get("data"), f"{where}.source.data")
        return f"data:{media_type};base64,{data}"
    if kind == "url":
        return want_string(source.get("url"), f"{where}.source.url")
    raise Untranslatable(f"'{where}': this image source cannot be translated", param=where)


def _tool_message(block: dict[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content")
    text = content if isinstance(content, str) else _text_of(content or [], where + ".content")
    if block.get("is_error"):
        text = f"[error] {text}"
    return {
        "role": "tool",
        "tool_call_id": openai_tool_id(
            want_string(block.get("tool_use_id"), f"{where}.tool_use_id")
        ),
        "content": text,
    }


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
            parts.append({"type": "text", "text": want_string(block.get("text"), f"{here}.text")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, here)}})
        elif kind == "tool_result":
            tools.append(_tool_message(block, here))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # signed for the provider that made it: dropped when crossing dialects
        else:
            raise Untranslatable(
                f"'{here}': a {kind!r} block cannot be sent to an OpenAI provider", param=here
            )
    return parts, tools


def _openai_assistant(blocks: list[Any], where: str) -> dict[str, Any] | None:
    """An assistant turn as an OpenAI message; None when nothing in it crosses (thinking only)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        here = f"{where}[{j}]"
        if kind == "text":
            texts.append(want_string(block.get("text"), f"{here}.text"))
        elif kind == "tool_use":
            calls.append({
                "id": openai_tool_id(want_string(block.get("id"), f"{here}.id")),
                "type": "function",
                "function": {
                    "name": want_string(block.get("name"), f"{here}.name"),
                    "arguments": json.dumps(want_object(block.get("input"), f"{here}.input")),
                },
            })  # fmt: skip
        elif kind in ("thinking", "redacted_thinking"):
            continue  # see above
        else:
            raise Untranslatable(
                f"'{here}': a {kind!r} block cannot be sent to an OpenAI provider", param=here
            )
    text = "".join(texts)
    if not text and not calls:
        return None
    turn: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _openai_messages(obj: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = obj.get("system")
    if system:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    spoken = 0
    for i, message in enumerate(obj["messages"]):
        where = f"messages[{i}].content"
        content = message["content"]
        if message["role"] == "system":  # a system message mid-conversation: kept in its place
            messages.append({"role": "system", "content": _text_of(content, where)})
            continue
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if message["role"] == "user":
            parts, tool_messages = _openai_parts(blocks, where)
            messages.extend(tool_messages)
            if parts:
                messages.append({"role": "user", "content": parts})
            spoken += len(tool_messages) + bool(parts)
        elif (turn := _openai_assistant(blocks, where)) is not None:
            messages.append(turn)
            spoken += 1
    if not spoken:
        raise Untranslatable(
            "'messages' has no content: an OpenAI provider needs at least one message with some",
            param="messages",
        )
    return messages


def _openai_tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(want_list(tools, "tools")):
        if not isinstance(tool, dict) or "input_schema" not in tool:
            raise Untranslatable(
                f"'tools[{i}]': only custom tools (with input_schema) can be translated",
                param=f"tools[{i}]",
            )
        function = {
            "name": want_string(tool.get("name"), f"tools[{i}].name"),
            "parameters": want_object(tool["input_schema"], f"tools[{i}].input_schema"),
        }
        description = want_string(tool.get("description"), f"tools[{i}].description")
        if description:
            function["description"] = description
        out.append({"type": "function", "function": function})
    return out


def _openai_tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if choice is None:
        return
    choice = want_object(choice, "tool_choice")
    kind = want_string(choice.get("type"), "tool_choice.type")
    simple = {"auto": "auto", "any": "required", "none": "none"}
    if kind in simple:
        out["tool_choice"] = simple[kind]
    elif kind == "tool":
        name = want_string(choice.get("name"), "tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise RequestError(
            "'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'", param="tool_choice.type"
        )
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False


def anthropic_to_openai(obj: dict[str, Any], model: str, stream: bool, crossing: Crossing) -> bytes:
    for key, value in obj.items():
        if key not in _ANTHROPIC_PASSED and key not in _ANTHROPIC_DROPPED and value is not None:
            crossing.cannot(f"'{key}' cannot be translated for an OpenAI provider", key)
    out: dict[str, Any] = {"model": model, "messages": _openai_messages(obj)}
    # Reasoning models (o-series, gpt-5) refuse max_tokens for max_completion_tokens, and take
    # no sampling parameters.
    out["max_completion_tokens" if crossing.reasoning else "max_tokens"] = obj["max_tokens"]
    for key in ("temperature", "top_p"):
        if obj.get(key) is not None and not crossing.reasoning:
            out[key] = obj[key]
    _output_config(obj, out, crossing)
    if obj.get("stop_sequences"):
        out["stop"] = list(obj["stop_sequences"])
    if obj.get("tools"):
        out["tools"] = _openai_tools(obj["tools"])
    _openai_tool_choice(obj.get("tool_choice"), out)
    metadata = want_object(obj.get("metadata") or {}, "metadata")
    user = want_string(metadata.get("user_id"), "metadata.user_id")
    if user:
        out["user"] = user
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # message_delta needs the usage
    return json.dumps(out).encode()


def _output_config(obj: dict[str, Any], out: dict[str, Any], crossing: Crossing) -> None:
    """Anthropic's output_config: `effort` becomes a reasoning model's reasoning_effort (other
    models have no such knob: dropped); a `format` (structured output) has no translation."""
    config = want_object(obj.get("output_config") or {}, "output_config")
    if config.get("format") is not None:
        crossing.cannot(
            "'output_config.format' (structured output) cannot be translated for an OpenAI "
            "provider",
            "output_config.format",
        )
    effort = config.get("effort")
    if crossing.reasoning and isinstance(effort, str):
        out["reasoning_effort"] = effort if effort in _EFFORTS else "high"  # "max": the most


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


def _error_text(error: Any) -> str:
    """The message of an in-band error, whatever shape it came in."""
    if isinstance(error, dict):
        return str(error.get("message", "upstream error"))
    return str(error or "upstream error")


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + dumps(obj) + b"\n\n"


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
        self._finished = False  # the choice's finish_reason has passed: the answer is complete
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
                if not self._finished:
                    return b"".join(out), INCOMPLETE_STREAM.message
                out.append(self._end())
                break
            chunk = event_object(event.data)
            if chunk is None:
                continue
            if "error" in chunk:
                return b"".join(out), _error_text(chunk["error"])
            self._chunk(chunk, out)
        return b"".join(out), None

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
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
            if choice.get("index", 0) == 0:  # an Anthropic message has one answer
                self._choice(choice, out)

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta") or {}
        if delta.get("content"):
            if self._block_kind != "text":
                out.append(self._open("text", {"type": "text", "text": ""}))
            out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            out.append(self._tool_delta(call))
        if choice.get("finish_reason"):
            self._finished = True
            self._stop_reason = FINISH_TO_STOP.get(choice["finish_reason"], "end_turn")

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
            data = event_object(event.data)
            if data is None:
                continue
            kind = data.get("type")
            if event.event == b"error" or kind == "error":
                return b"".join(out), _error_text(data.get("error"))
            if kind == "message_stop":
                out.append(self._end())
                break
            handler = self._EVENTS.get(kind) if isinstance(kind, str) else None
            if handler is not None:
                out.extend(handler(self, data))
        return b"".join(out), None

    def _message_start(self, data: dict[str, Any]) -> list[bytes]:
        message: dict[str, Any] = data.get("message") or {}
        self._id = "chatcmpl-" + str(message.get("id", ""))
        self._model = message.get("model")
        self._usage = dict(message.get("usage") or {})
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, data: dict[str, Any]) -> list[bytes]:
        block = data.get("content_block") or {}
        if block.get("type") != "tool_use":
            return []
        position = self._tools[data.get("index", 0)] = len(self._tools)
        call = {"index": position, "id": openai_tool_id(str(block.get("id", ""))),
                "type": "function",
                "function": {"name": block.get("name", ""), "arguments": ""}}  # fmt: skip
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, data: dict[str, Any]) -> list[bytes]:
        delta = data.get("delta") or {}
        if delta.get("type") == "text_delta":
            return [self._chunk({"content": delta.get("text", "")})]
        if delta.get("type") == "input_json_delta":
            position = self._tools.get(data.get("index", 0), 0)
            call = {"index": position, "function": {"arguments": delta.get("partial_json", "")}}
            return [self._chunk({"tool_calls": [call]})]
        return []  # thinking deltas: not for an OpenAI client

    def _message_delta(self, data: dict[str, Any]) -> list[bytes]:
        self._usage.update(data.get("usage") or {})
        stop = (data.get("delta") or {}).get("stop_reason") or "end_turn"
        return [self._chunk({}, STOP_TO_FINISH.get(stop, "stop"))]

    _EVENTS: ClassVar[
        dict[str, Callable[[AnthropicToOpenAIStream, dict[str, Any]], list[bytes]]]
    ] = {
        "message_start": _message_start,
        "content_block_start": _block_start,
        "content_block_delta": _block_delta,
        "message_delta": _message_delta,
    }

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
