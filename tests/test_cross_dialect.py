"""Failover across dialects, end to end with the official SDKs over real sockets: an OpenAI
client served by an Anthropic-dialect provider and an Anthropic client served by an OpenAI one,
plain, streamed and with tools, and a cascade that crosses dialects after a 429."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import openai
import trio

from router.serving.server import Running
from tests.live import SDK_LEFTOVERS, Exchange, FakeUpstream, live_gateway

pytestmark = SDK_LEFTOVERS

HELLO = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OPENAI_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
ANTHROPIC_TOOL = {"name": "get_weather", "input_schema": SCHEMA}


async def limited(exchange: Exchange) -> None:
    error = {"error": {"message": "slow down", "type": "rate_limit_error"}}
    await exchange.json_answer(429, error, **{"retry-after": "30"})


@asynccontextmanager
async def gateway_to(dialect: str, first: FakeUpstream | None = None) -> AsyncIterator[Running]:
    """Route `any` to a mock provider of `dialect`; with `first`, an OpenAI-dialect scripted
    provider is tried before it."""
    upstreams = {"first": first} if first else {}
    targets = [*(["first/up"] if first else []), "mock/up"]
    with trio.fail_after(20):
        async with live_gateway(
            upstreams,
            extra_providers={"mock": {"dialect": dialect, "mock": {}}},
            routes=[{"match": "any", "targets": targets}],
        ) as gw:
            yield gw


async def test_openai_client_served_by_an_anthropic_provider() -> None:
    async with gateway_to("anthropic") as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        plain = await sdk.chat.completions.create(model="any", messages=HELLO)  # no max_tokens
        pieces: list[str] = []
        usage = None
        stream = await sdk.chat.completions.create(
            model="any", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                usage = chunk.usage or usage
        tools = await sdk.chat.completions.create(
            model="any", messages=HELLO, tools=[OPENAI_TOOL], tool_choice="required"
        )
        streamed_args: list[str] = []
        finish = None
        stream = await sdk.chat.completions.create(
            model="any", messages=HELLO, tools=[OPENAI_TOOL], stream=True
        )
        async with stream:
            async for chunk in stream:
                for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                    streamed_args.append((call.function and call.function.arguments) or "")
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
        await sdk.close()
    assert (
        plain.choices[0].message.content == "[mock] word0 word1 word2 word3 word4 word5 word6 word7"
    )
    assert plain.choices[0].finish_reason == "stop" and plain.model == "up"
    assert plain.usage is not None and plain.usage.completion_tokens == 8
    assert "".join(pieces) == plain.choices[0].message.content
    assert usage is not None and usage.prompt_tokens == 10 and usage.completion_tokens == 8
    [call] = tools.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "[mock]"
    }
    assert tools.choices[0].finish_reason == "tool_calls"
    assert json.loads("".join(streamed_args)) == {"city": "[mock]"} and finish == "tool_calls"


async def test_anthropic_client_served_by_an_openai_provider() -> None:
    async with gateway_to("openai") as gw:
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        plain = await sdk.messages.create(model="any", max_tokens=100, messages=HELLO)
        async with sdk.messages.stream(model="any", max_tokens=100, messages=HELLO) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        tools = await sdk.messages.create(
            model="any", max_tokens=100, messages=HELLO, tools=[ANTHROPIC_TOOL]
        )
        async with sdk.messages.stream(
            model="any", max_tokens=100, messages=HELLO, tools=[ANTHROPIC_TOOL]
        ) as stream:
            streamed = await stream.get_final_message()
        await sdk.close()
    assert plain.content[0].type == "text"
    assert plain.content[0].text == "[mock] word0 word1 word2 word3 word4 word5 word6 word7"
    assert plain.stop_reason == "end_turn" and plain.usage.output_tokens == 8
    assert text == plain.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 8 and final.usage.input_tokens == 10
    [block] = tools.content
    assert block.type == "tool_use" and block.input == {"city": "[mock]"}
    assert tools.stop_reason == "tool_use"
    [streamed_block] = streamed.content
    assert streamed_block.type == "tool_use" and streamed_block.input == {"city": "[mock]"}


async def test_a_429_fails_over_to_the_other_dialect_invisibly() -> None:
    first = FakeUpstream(limited)
    async with gateway_to("anthropic", first) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        answer = await sdk.chat.completions.with_raw_response.create(model="any", messages=HELLO)
        await sdk.close()
    assert answer.headers["x-cascade-provider"] == "mock"
    assert answer.headers["x-cascade-attempts"] == "2"
    assert answer.parse().choices[0].message.content.startswith("[mock] ")  # type: ignore[union-attr]
    assert len(first.exchanges) == 1


async def test_a_tool_conversation_moves_providers_with_its_ids() -> None:
    """The history an OpenAI client sends (a tool call with an id Anthropic would refuse, and
    its result) reaches an Anthropic provider with the id mapped the same way on both sides."""
    seen: list[dict[str, Any]] = []

    async def anthropic_provider(exchange: Exchange) -> None:
        seen.append(exchange.json)
        answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "up",
                  "content": [{"type": "text", "text": "sunny"}], "stop_reason": "end_turn",
                  "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1,
                                                   "cache_read_input_tokens": 3}}  # fmt: skip
        await exchange.json_answer(200, answer)

    up = FakeUpstream(anthropic_provider)
    with trio.fail_after(20):
        async with live_gateway(
            {"a": up}, providers={"a": {"dialect": "anthropic"}},
            routes=[{"match": "any", "targets": ["a/up"]}],
        ) as gw:  # fmt: skip
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            call = {"id": "call.1/x", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
            answer = await sdk.chat.completions.create(
                model="any",
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call.1/x", "content": "12 C"},
                ],
                tools=[OPENAI_TOOL],
            )
            await sdk.close()
    [sent] = seen
    assert sent["system"] == "be brief" and sent["max_tokens"] == 4096
    tool_use = sent["messages"][1]["content"][0]
    tool_result = sent["messages"][2]["content"][0]
    assert tool_use["type"] == "tool_use" and tool_use["input"] == {"city": "Oslo"}
    assert tool_use["id"] == tool_result["tool_use_id"] != "call.1/x"
    assert all(c.isalnum() or c in "_-" for c in tool_use["id"])
    assert tool_result["content"] == "12 C"
    assert answer.choices[0].message.content == "sunny"
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens == 8 and usage.completion_tokens == 1
    assert (
        usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 3
    )
