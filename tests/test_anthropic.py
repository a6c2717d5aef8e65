"""The Anthropic Messages dialect end to end, driven by the official `anthropic` SDK over real
sockets: Cascade in front of Anthropic-dialect providers (the mock, and scripted upstreams)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx
import pytest
import trio

from router.serving.server import Running
from tests.live import SDK_LEFTOVERS, Exchange, FakeUpstream, live_gateway

pytestmark = SDK_LEFTOVERS

HELLO = [{"role": "user", "content": "hi"}]
WEATHER = {
    "name": "get_weather",
    "description": "weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
    "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
    "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1},
}  # fmt: skip


@asynccontextmanager
async def claude(
    upstreams: dict[str, FakeUpstream] | None = None, **settings: dict[str, Any]
) -> AsyncIterator[tuple[Running, anthropic.AsyncAnthropic]]:
    """A gateway whose `claude` route goes, in order, to Anthropic-dialect providers: scripted
    `upstreams`, then providers given by their settings (e.g. a mock), and an SDK client."""
    upstreams = upstreams or {}
    with trio.fail_after(20):
        async with live_gateway(
            upstreams,
            providers={n: {"dialect": "anthropic", **settings.pop(n, {})} for n in upstreams},
            extra_providers={n: {"dialect": "anthropic", **p} for n, p in settings.items()},
            routes=[
                {"match": "claude", "targets": [f"{n}/claude-up" for n in [*upstreams, *settings]]}
            ],
        ) as gw:
            sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-ant-client", max_retries=0)
            yield gw, sdk
            await sdk.close()


async def test_messages_plain_and_streamed_through_the_mock() -> None:
    async with claude(m={"mock": {}}) as (_, sdk):
        message = await sdk.messages.create(model="claude", max_tokens=100, messages=HELLO)
        texts: list[str] = []
        async with sdk.messages.stream(model="claude", max_tokens=100, messages=HELLO) as stream:
            async for text in stream.text_stream:
                texts.append(text)
            final = await stream.get_final_message()
        counted = await sdk.messages.count_tokens(model="claude", messages=HELLO)
    assert message.content[0].type == "text"
    assert message.content[0].text == "[m] word0 word1 word2 word3 word4 word5 word6 word7"
    assert message.stop_reason == "end_turn" and message.model == "claude-up"
    assert "".join(texts) == message.content[0].text and len(texts) == 9
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 8
    assert counted.input_tokens >= 1  # an estimate (docs/dialects.md)


async def test_tool_use_plain_and_streamed_arguments() -> None:
    async with claude(m={"mock": {}}) as (_, sdk):
        message = await sdk.messages.create(
            model="claude", max_tokens=100, messages=HELLO, tools=[WEATHER]
        )
        partials: list[str] = []
        async with sdk.messages.stream(
            model="claude", max_tokens=100, messages=HELLO, tools=[WEATHER]
        ) as stream:
            async for event in stream:
                if event.type == "input_json":
                    partials.append(event.partial_json)
            final = await stream.get_final_message()
    [block] = message.content
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"city": "[m]"} and message.stop_reason == "tool_use"
    [streamed] = final.content
    assert streamed.type == "tool_use" and streamed.input == {"city": "[m]"}
    assert len(partials) >= 3 and json.loads("".join(partials)) == {"city": "[m]"}


async def test_keys_versions_and_beta_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider's own key goes in x-api-key with anthropic-version; the client's key is never
    forwarded; anthropic-beta from the client is passed on; only the model is changed."""

    async def answer(exchange: Exchange) -> None:
        await exchange.json_answer(200, MESSAGE)

    monkeypatch.setenv("CASCADE_TEST_ANTHROPIC_KEY", "sk-ant-provider")
    up = FakeUpstream(answer)
    provider = {"api_key_env": "CASCADE_TEST_ANTHROPIC_KEY", "anthropic_version": "2024-01-01"}
    raw = b'{"model":  "claude", "max_tokens": 5, "messages": [{"role":"user","content":"hi"}]}'
    headers = {"x-api-key": "sk-ant-client", "anthropic-beta": "tools-2024-05-16"}
    async with claude({"a": up}, a=provider) as (gw, _):
        async with httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/v1/messages", content=raw, headers=headers)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "ok"
    sent = up.exchanges[-1]
    assert sent.headers["x-api-key"] == "sk-ant-provider"
    assert sent.headers["anthropic-version"] == "2024-01-01"
    assert sent.headers["anthropic-beta"] == "tools-2024-05-16"
    assert "authorization" not in sent.headers
    assert sent.body == raw.replace(b'"claude"', b'"claude-up"')


async def test_rate_limit_and_overload_fail_over_then_errors_have_anthropics_shape() -> None:
    """429 and 529 from Anthropic providers fail over; when all are exhausted the SDK raises the
    error class of the status, from a body in Anthropic's shape with the request id."""

    def error(status: int, kind: str, **headers: str) -> Any:
        async def handler(exchange: Exchange) -> None:
            body = {"type": "error", "error": {"type": kind, "message": kind}}
            await exchange.json_answer(status, body, **headers)

        return handler

    limited = FakeUpstream(error(429, "rate_limit_error", **{"retry-after": "30"}))
    overloaded = FakeUpstream(error(529, "overloaded_error"))

    async def answer(exchange: Exchange) -> None:
        await exchange.json_answer(200, MESSAGE)

    ok = FakeUpstream(answer)
    async with claude({"a": limited, "b": overloaded, "c": ok}) as (_, sdk):
        served = await sdk.messages.with_raw_response.create(
            model="claude", max_tokens=5, messages=HELLO
        )
    assert served.headers["x-cascade-provider"] == "c"
    assert served.headers["x-cascade-attempts"] == "3"

    async with claude({"a": limited, "b": overloaded}) as (_, sdk):
        with pytest.raises(anthropic.RateLimitError) as limited_error:
            await sdk.messages.create(model="claude", max_tokens=5, messages=HELLO)
        with pytest.raises(anthropic.BadRequestError) as bad:
            await sdk.messages.create(model="claude", max_tokens=0, messages=HELLO)
        with pytest.raises(anthropic.NotFoundError) as missing:
            await sdk.messages.create(model="nope", max_tokens=5, messages=HELLO)
    body = limited_error.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"  # every target rate limited: 429
    assert body["error"]["cascade_code"] == "retry_exhausted"
    assert [a["status"] for a in body["error"]["attempts"]] == [429, 529]
    assert body["request_id"] == limited_error.value.response.headers["x-request-id"]
    assert limited_error.value.response.headers["retry-after"] == "30"
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


async def test_a_stream_that_opens_with_an_error_event_fails_over() -> None:
    async def overloaded_in_band(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        await exchange.body_part(b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n")
        await exchange.body_part(b"", more=False)

    async with claude({"a": FakeUpstream(overloaded_in_band)}, m={"mock": {}}) as (_, sdk):
        async with sdk.messages.stream(model="claude", max_tokens=100, messages=HELLO) as stream:
            text = "".join([t async for t in stream.text_stream])
    assert text.startswith("[m] ")


async def test_what_cannot_be_translated_is_a_400_naming_the_field() -> None:
    """Before anything is sent: n=2 cannot be said to an Anthropic provider, top_k to an
    OpenAI one; the 400 names the field, in the client's own error shape."""
    up = FakeUpstream()
    async with claude({"a": up}) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.post(
            "/v1/chat/completions", json={"model": "claude", "messages": HELLO, "n": 2}
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert up.exchanges == []
    with trio.fail_after(20):
        async with live_gateway({}, extra_providers={"o": {"mock": {}}},
                                routes=[{"match": "gpt", "targets": ["o/m"]}]) as gw:  # fmt: skip
            sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
            with pytest.raises(anthropic.BadRequestError) as bad:
                await sdk.messages.create(
                    model="gpt", max_tokens=5, messages=HELLO, extra_body={"top_k": 3}
                )
            await sdk.close()
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "'top_k' cannot be translated" in bad.value.body["error"]["message"]  # type: ignore[index]
