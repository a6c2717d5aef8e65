"""Translation between the OpenAI and Anthropic dialects, unit by unit, from realistic fixtures:
requests, answers, stop reasons, usage with cache tokens, tool-call ids and whole streams."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from actors.sse import SSEEvent
from router.dialects.translate import (
    STOP_TO_FINISH,
    AnthropicToOpenAIStream,
    Crossing,
    OpenAIToAnthropicStream,
    anthropic_answer_to_openai,
    anthropic_to_openai,
    anthropic_tool_id,
    openai_answer_to_anthropic,
    openai_to_anthropic,
    openai_tool_id,
)
from router.errors import RequestError, Untranslatable

CROSSING = Crossing()

TOOL = {
    "type": "function",
    "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
}


def to_anthropic(**obj: Any) -> dict[str, Any]:
    return json.loads(openai_to_anthropic({"model": "m", **obj}, "claude-up", CROSSING))


def to_openai(stream: bool = False, **obj: Any) -> dict[str, Any]:
    return json.loads(
        anthropic_to_openai({"model": "m", "max_tokens": 50, **obj}, "gpt-up", stream, CROSSING)
    )


@given(st.text(min_size=1, max_size=40))
@example("0\n")  # ($ in a pattern also matches before a final newline)
def test_tool_ids_map_deterministically_and_back(openai_id: str) -> None:
    mapped = anthropic_tool_id(openai_id)
    assert mapped == anthropic_tool_id(openai_id)
    assert mapped and all(c.isascii() and (c.isalnum() or c in "_-") for c in mapped)
    assert openai_tool_id(mapped) == openai_id


def test_openai_request_to_anthropic() -> None:
    sent = to_anthropic(
        messages=[
            {"role": "system", "content": "one"},
            {"role": "developer", "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
            {"role": "assistant", "content": "calling", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "r1"},
            {"role": "tool", "tool_call_id": "call_2", "content": "r2"},
        ],
        tools=[TOOL], tool_choice="required", parallel_tool_calls=False, stop="END",
        temperature=0.5, top_p=0.9, user="u1", stream=True,
    )  # fmt: skip
    assert sent["model"] == "claude-up" and sent["system"] == "one\n\ntwo"
    assert sent["max_tokens"] == 4096  # the provider's default_max_tokens: the client gave none
    user, assistant, results = sent["messages"]
    assert user["content"][1] == {
        "type": "image",
        "source": {"type": "url", "url": "https://x/cat.png"},
    }
    assert user["content"][2]["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": "AAAA",
    }
    assert assistant["content"][0] == {"type": "text", "text": "calling"}
    assert [b["id"] for b in assistant["content"][1:]] == ["call_1", "call_2"]
    assert assistant["content"][1]["input"] == {"a": 1}
    # parallel tool results: one user turn, in order (Anthropic wants turns to alternate)
    assert [(b["tool_use_id"], b["content"]) for b in results["content"]] == [
        ("call_1", "r1"),
        ("call_2", "r2"),
    ]
    assert sent["tools"] == [{"name": "f", "input_schema": {"type": "object"}, "description": "d"}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert sent["stop_sequences"] == ["END"] and sent["metadata"] == {"user_id": "u1"}
    assert (sent["temperature"], sent["top_p"], sent["stream"]) == (0.5, 0.9, True)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temperature": 1.5}, "temperature"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_what_anthropic_cannot_say_is_untranslatable_by_field(
    extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(Untranslatable) as info:
        to_anthropic(**{"messages": [{"role": "user", "content": "hi"}], **extra})
    assert info.value.param == param and info.value.status == 400


def test_what_keeps_its_meaning_is_dropped_for_anthropic() -> None:
    sent = to_anthropic(
        messages=[{"role": "user", "content": "hi"}],
        store=True, seed=7, service_tier="auto", reasoning_effort="low",
        metadata={"app": "x"}, response_format={"type": "text"}, prompt_cache_key="k",
    )  # fmt: skip
    assert set(sent) == {"model", "messages", "max_tokens"}


def test_drop_params_drops_top_level_fields_but_never_content() -> None:
    """A provider with drop_params takes what it can of the request: the fields it cannot say
    are left out. Content (a part it cannot say) still makes it ineligible."""
    dropping = Crossing(drop=True)
    sent = json.loads(
        openai_to_anthropic(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2,
             "logprobs": True, "temperature": 1.5, "response_format": {"type": "json_object"}},
            "c", dropping,
        )
    )  # fmt: skip
    assert set(sent) == {"model", "messages", "max_tokens"}
    with pytest.raises(Untranslatable):
        openai_to_anthropic(
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "c",
            dropping,
        )
    back = json.loads(
        anthropic_to_openai(
            {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}],
             "top_k": 5, "output_config": {"format": {"type": "json_schema"}}},
            "g", False, dropping,
        )
    )  # fmt: skip
    assert set(back) == {"model", "messages", "max_tokens"}


def test_anthropic_request_to_openai() -> None:
    sent = to_openai(
        stream=True,
        system=[{"type": "text", "text": "be brief"}],
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "checking"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 C"},
                {"type": "text", "text": "and tomorrow?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "BB"}},
            ]},
        ],
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        metadata={"user_id": "u1"},
    )  # fmt: skip
    system, _user, assistant, tool, follow_up = sent["messages"]
    assert system == {"role": "system", "content": "be brief"}
    assert assistant["content"] == "checking"  # the thinking block is dropped when crossing
    assert assistant["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "12 C"}
    assert follow_up["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64,BB"},
    }
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    assert sent["stop"] == ["END"] and sent["user"] == "u1" and sent["max_tokens"] == 50
    assert sent["stream_options"] == {"include_usage": True}  # message_delta needs the usage


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 5}, "top_k"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format"),
        ({"mcp_servers": [{"type": "url", "url": "https://x"}]}, "mcp_servers"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document"}]}]},
            "messages[0].content[0]",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ],
)
def test_what_openai_cannot_say_is_untranslatable_by_field(
    extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(Untranslatable) as info:
        to_openai(**{"messages": [{"role": "user", "content": "hi"}], **extra})
    assert info.value.param == param


def test_claude_codes_fields_are_dropped_for_openai() -> None:
    """Thinking, context management, cache hints, effort (for a model with no such knob) and the
    serving tier change nothing in what the answer says: dropped when crossing."""
    sent = to_openai(
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        thinking={"type": "adaptive"},
        output_config={"effort": "medium"},
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        service_tier="auto",
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
    )  # fmt: skip
    assert set(sent) == {"model", "messages", "max_tokens"}
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["messages"][1] == {"role": "user", "content": [{"type": "text", "text": "hi"}]}


def test_a_reasoning_model_gets_max_completion_tokens_and_the_effort() -> None:
    reasoning = Crossing(reasoning=True)
    sent = json.loads(
        anthropic_to_openai(
            {"model": "m", "max_tokens": 64, "temperature": 0.2,
             "messages": [{"role": "user", "content": "hi"}], "output_config": {"effort": "low"}},
            "gpt-5", False, reasoning,
        )
    )  # fmt: skip
    assert sent["max_completion_tokens"] == 64 and "max_tokens" not in sent
    assert sent["reasoning_effort"] == "low" and "temperature" not in sent


def test_a_system_message_mid_conversation_stays_in_its_place_for_openai() -> None:
    sent = to_openai(
        system="first",
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": [{"type": "text", "text": "now be terse"}]},
            {"role": "user", "content": "go"},
        ],
    )
    roles = [(m["role"], m["content"]) for m in sent["messages"]]
    assert roles[0] == ("system", "first") and roles[3] == ("system", "now be terse")
    assert [r for r, _ in roles] == ["system", "user", "assistant", "system", "user"]


@pytest.mark.parametrize(("stop", "finish"), sorted(STOP_TO_FINISH.items()))
def test_every_stop_reason_has_a_finish_reason(stop: str, finish: str) -> None:
    answer = {"id": "msg_1", "model": "c", "content": [{"type": "text", "text": "x"}],
              "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}}  # fmt: skip
    assert (
        json.loads(anthropic_answer_to_openai(json.dumps(answer).encode()))["choices"][0][
            "finish_reason"
        ]
        == finish
    )


def test_answers_both_ways_with_cache_tokens_and_tool_calls() -> None:
    anthropic_answer = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                    {"type": "text", "text": "hi"},
                    {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {"x": 1}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 5,
                  "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
    }  # fmt: skip
    openai = json.loads(anthropic_answer_to_openai(json.dumps(anthropic_answer).encode()))
    message = openai["choices"][0]["message"]
    assert message["content"] == "hi" and openai["choices"][0]["finish_reason"] == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    # OpenAI's prompt_tokens include cached tokens, written or read; Anthropic's input_tokens not.
    assert openai["usage"] == {"prompt_tokens": 130, "completion_tokens": 5, "total_tokens": 135,
                               "prompt_tokens_details": {"cached_tokens": 100}}  # fmt: skip
    back = json.loads(openai_answer_to_anthropic(json.dumps(openai).encode()))
    assert back["stop_reason"] == "tool_use" and back["model"] == "claude-up"
    assert back["content"][1] == {
        "type": "tool_use",
        "id": "toolu_9",
        "name": "f",
        "input": {"x": 1},
    }
    assert back["usage"]["input_tokens"] == 30 and back["usage"]["cache_read_input_tokens"] == 100


def sse(obj: Any, event: str | None = None) -> SSEEvent:
    return SSEEvent(json.dumps(obj).encode(), event.encode() if event else None)


def parse(frames: bytes) -> list[tuple[str | None, Any]]:
    out = []
    for block in frames.decode().strip().split("\n\n"):
        event = None
        data = ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((event, data if data == "[DONE]" else json.loads(data)))
    return out


def test_openai_stream_with_parallel_tool_calls_becomes_anthropic_blocks() -> None:
    """OpenAI's tool_calls[index] counts tool calls; Anthropic's index counts content blocks:
    text first (block 0), then one block per call (1 and 2)."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> SSEEvent:
        return sse({"id": "chatcmpl-1", "model": "gpt-up",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})  # fmt: skip

    def call(i: int, **f: str) -> dict[str, Any]:
        head = {"id": f"call_{i}", "type": "function"} if "name" in f else {}
        return {"tool_calls": [{"index": i, **head, "function": f}]}

    writer = OpenAIToAnthropicStream()
    frames, error = writer.relay([
        chunk({"role": "assistant", "content": "Let me"}), chunk({"content": " check."}),
        chunk(call(0, name="a", arguments="")), chunk(call(0, arguments='{"x":')),
        chunk(call(0, arguments="1}")), chunk(call(1, name="b", arguments='{"y":2}')),
        chunk({}, "tool_calls"),
        sse({"id": "chatcmpl-1", "model": "gpt-up", "choices": [],
             "usage": {"prompt_tokens": 9, "completion_tokens": 4,
                       "prompt_tokens_details": {"cached_tokens": 2}}}),
        SSEEvent(b"[DONE]"),
    ])  # fmt: skip
    assert error is None and writer.done
    events = parse(frames)
    assert [e for e, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    starts = [d for e, d in events if e == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "text"),
        (1, "tool_use"),
        (2, "tool_use"),
    ]
    assert [s["content_block"].get("id") for s in starts[1:]] == ["call_0", "call_1"]
    json_parts = [(d["index"], d["delta"]["partial_json"]) for e, d in events
                  if e == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]  # fmt: skip
    assert json_parts == [(1, '{"x":'), (1, "1}"), (2, '{"y":2}')]
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"input_tokens": 7, "output_tokens": 4, "cache_read_input_tokens": 2,
                              "cache_creation_input_tokens": 0}  # fmt: skip


def test_anthropic_stream_becomes_openai_chunks() -> None:
    events = [
        sse({"type": "message_start", "message": {"id": "msg_1", "model": "claude-up",
             "usage": {"input_tokens": 12, "output_tokens": 1}}}, "message_start"),
        sse({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}}, "content_block_start"),
        sse({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "x"}}, "content_block_delta"),
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}, "content_block_start"),
        sse({"type": "ping"}, "ping"),
        sse({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}}, "content_block_delta"),
        sse({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}, "content_block_start"),
        sse({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}}, "content_block_delta"),
        sse({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 6}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]  # fmt: skip
    for include_usage in (False, True):
        writer = AnthropicToOpenAIStream(include_usage)
        frames, error = writer.relay(events)
        chunks = [d for _, d in parse(frames)]
        assert error is None and writer.done and chunks[-1] == "[DONE]"
        deltas = [c["choices"][0]["delta"] for c in chunks[:-1] if c != "[DONE]" and c["choices"]]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert {"content": "x"} not in deltas  # thinking is not an OpenAI delta
        assert deltas[1] == {"content": "Hi"}
        assert deltas[2]["tool_calls"][0] == {"index": 0, "id": "toolu_1", "type": "function",
                                              "function": {"name": "f", "arguments": ""}}  # fmt: skip
        assert deltas[3]["tool_calls"][0]["function"]["arguments"] == "{}"
        finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]]
        assert finishes[-1] == "tool_calls"
        usage = [c["usage"] for c in chunks[:-1] if not c["choices"]]
        assert usage == ([{"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18,
                           "prompt_tokens_details": {"cached_tokens": 0}}] if include_usage else [])  # fmt: skip


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), TEXT), min_size=1, max_size=6))
def test_text_conversations_round_trip(turns: list[tuple[str, str]]) -> None:
    """OpenAI -> Anthropic -> OpenAI keeps what both dialects can say: the text of each turn, in
    order (consecutive turns of one role are merged, as Anthropic requires; empty ones, which
    Anthropic refuses, are left out, and a conversation of nothing but those is a 400)."""
    messages = [{"role": role, "content": text} for role, text in turns]
    if not any(text for _, text in turns):
        with pytest.raises(RequestError) as info:
            openai_to_anthropic({"model": "m", "messages": messages}, "c", Crossing(10))
        assert info.value.param == "messages"
        return
    anthropic_body = json.loads(
        openai_to_anthropic({"model": "m", "messages": messages}, "c", Crossing(10))
    )
    back = json.loads(anthropic_to_openai(anthropic_body, "g", False, CROSSING))

    def merged(msgs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for m in msgs:
            content = m["content"]
            text = (
                content
                if isinstance(content, str)
                else "".join(p.get("text", "") for p in content or [])
            )
            if out and out[-1][0] == m["role"]:
                out[-1] = (m["role"], out[-1][1] + text)
            else:
                out.append((m["role"], text))
        return out

    assert merged(back["messages"]) == merged([m for m in messages if m["content"]])


# What translation once built and the target refused (issue 24.5): refused with the field, or
# translated to something valid where one exists.


def refused(call: Any) -> str:
    with pytest.raises(RequestError) as info:
        call()
    assert info.value.status == 400
    assert info.value.param is not None
    return info.value.param


def test_a_system_only_conversation_is_refused_for_anthropic() -> None:
    system_only = [{"role": "system", "content": "be brief"}]
    assert refused(lambda: to_anthropic(messages=system_only)) == "messages"


def test_empty_user_text_is_left_out_for_anthropic() -> None:
    sent = to_anthropic(
        messages=[
            {"role": "user", "content": ""},
            {"role": "assistant", "content": None},  # nothing said: left out as well
            {
                "role": "user",
                "content": [{"type": "text", "text": ""}, {"type": "text", "text": "hi"}],
            },
        ]
    )
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


@pytest.mark.parametrize("arguments", ["[1,2]", '"text"', "3", "null"])
def test_tool_arguments_that_are_not_an_object_are_refused_for_anthropic(arguments: str) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]
    assert refused(lambda: to_anthropic(messages=messages)) == (
        "messages[1].tool_calls[0].function.arguments"
    )


def test_an_anthropic_conversation_with_no_content_is_refused_for_openai() -> None:
    assert refused(lambda: to_openai(messages=[{"role": "user", "content": []}])) == "messages"


def test_a_thinking_only_assistant_turn_is_left_out_for_openai() -> None:
    thinking = {"type": "thinking", "thinking": "hm", "signature": "s"}
    sent = to_openai(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": [thinking]},
            {"role": "user", "content": "b"},
        ]
    )
    assert [m["role"] for m in sent["messages"]] == ["user", "user"]


def test_translated_events_are_utf8_json_and_keep_what_orjson_cannot_write() -> None:
    """Translated events are written with orjson (UTF-8, compact), and with `json` when orjson
    cannot: an integer over 64 bits that an upstream's event held (read by `json`, with NaN)."""
    from actors.sse import SSEEvent
    from router.dialects.translate import AnthropicToOpenAIStream

    stream = AnthropicToOpenAIStream(include_usage=True)
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "m",
             "usage": {"input_tokens": 123456789012345678901234567890, "weird": float("nan")}}}  # fmt: skip
    delta = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "café ✓"}}  # fmt: skip
    raw = json.dumps(start).encode()  # NaN and a huge integer: only `json` reads it
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
           "usage": {"output_tokens": 2}}  # fmt: skip
    out, error = stream.relay([SSEEvent(raw, b"message_start"),
                               SSEEvent(json.dumps(delta).encode(), b"content_block_delta"),
                               SSEEvent(json.dumps(end).encode(), b"message_delta"),
                               SSEEvent(b'{"type": "message_stop"}', b"message_stop")])  # fmt: skip
    assert error is None
    lines = [line[6:] for line in out.split(b"\n") if line.startswith(b"data: ")]
    chunks = [json.loads(line) for line in lines if line != b"[DONE]"]
    assert chunks[1]["choices"][0]["delta"]["content"] == "café ✓"
    assert "café ✓".encode() in out  # UTF-8, not \\u escapes
    assert chunks[-1]["usage"]["prompt_tokens"] == 123456789012345678901234567890
