"""The mock upstream (demo providers, `cascade mock`) answers what a tool-using application asks:
tool calls (streamed arguments in several deltas), JSON mode, n choices, max_tokens. Driven by the
official openai SDK through the gateway, as an application trying the demo would."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anthropic
import httpx
import openai
import pytest
import trio
import trio.testing

from router.config import MockSettings
from router.tools.mock import MockUpstream
from router.web.server import serve_asgi
from tests.live import SDK_LEFTOVERS, live_gateway

pytestmark = SDK_LEFTOVERS

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
HELLO = [{"role": "user", "content": "hi"}]


@asynccontextmanager
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    with trio.fail_after(20):
        async with live_gateway(
            {}, extra_providers={"m": {"mock": {}}}, routes=[{"match": "*", "targets": ["m/x"]}]
        ) as gw:
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
            yield sdk
            await sdk.close()


async def test_tools_are_called_plain_and_streamed() -> None:
    async with client() as sdk:
        plain = await sdk.chat.completions.create(model="gpt", messages=HELLO, tools=[WEATHER])
        stream = await sdk.chat.completions.create(
            model="gpt", messages=HELLO, tools=[WEATHER], stream=True
        )
        pieces: list[str] = []
        names: list[str] = []
        finish = None
        async with stream:
            async for chunk in stream:
                for call in chunk.choices[0].delta.tool_calls or []:
                    names += [call.function.name] if call.function and call.function.name else []
                    pieces.append((call.function and call.function.arguments) or "")
                finish = chunk.choices[0].finish_reason or finish
    [call] = plain.choices[0].message.tool_calls or []
    assert plain.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "[m]", "days": 1}
    assert names == ["get_weather"] and finish == "tool_calls"
    assert len([p for p in pieces if p]) >= 3  # arguments arrive in several deltas
    assert json.loads("".join(pieces)) == {"city": "[m]", "days": 1}


async def test_json_mode_n_choices_and_max_tokens() -> None:
    async with client() as sdk:
        as_json = await sdk.chat.completions.create(
            model="gpt", messages=HELLO, response_format={"type": "json_object"}
        )
        two = await sdk.chat.completions.create(model="gpt", messages=HELLO, n=2)
        short = await sdk.chat.completions.create(model="gpt", messages=HELLO, max_tokens=3)
        none = await sdk.chat.completions.create(
            model="gpt", messages=HELLO, tools=[WEATHER], tool_choice="none"
        )
    assert json.loads(as_json.choices[0].message.content or "") == {
        "answer": "[m] word0 word1 word2 word3 word4 word5 word6 word7"
    }
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[1].message.content.startswith("[m][1] ")  # type: ignore[union-attr]
    assert short.choices[0].message.content == "[m] word0 word1 word2"
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 3
    assert none.choices[0].message.tool_calls is None


CLOCK = {
    "type": "function",
    "function": {"name": "read_clock", "parameters": {"type": "object", "properties": {}}},
}


async def test_an_agent_loop_ends_the_tool_said_is_quoted() -> None:
    """A tool call while the user has the last word (the tool the user names), text that quotes
    the tool's result once it comes back: an agent's loop ends (issue 19: it never did)."""
    async with client() as sdk:
        ask = [{"role": "user", "content": "what time is it? use read_clock"}]
        first = await sdk.chat.completions.create(model="gpt", messages=ask, tools=[WEATHER, CLOCK])
        [call] = first.choices[0].message.tool_calls or []
        assert call.function.name == "read_clock"
        turn = first.choices[0].message.model_dump(exclude_none=True)
        result = {"role": "tool", "tool_call_id": call.id, "content": "It is 10:42."}
        second = await sdk.chat.completions.create(
            model="gpt", messages=[*ask, turn, result], tools=[WEATHER, CLOCK], stream=True
        )
        text, finish = "", None
        async with second:
            async for chunk in second:
                assert not chunk.choices[0].delta.tool_calls
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        forced = await sdk.chat.completions.create(
            model="gpt", messages=[*ask, turn, result], tools=[CLOCK], tool_choice="required"
        )
    assert finish == "stop" and "the tool said: It is 10:42." in text
    assert forced.choices[0].finish_reason == "tool_calls"  # a forced call is always made


async def test_the_anthropic_mock_thinks_calls_and_then_answers() -> None:
    tool = {"name": "read_clock", "input_schema": {"type": "object", "properties": {}}}
    with trio.fail_after(20):
        async with live_gateway(
            {},
            extra_providers={"m": {"mock": {}, "dialect": "anthropic"}},
            routes=[{"match": "*", "targets": ["m/x"]}],
        ) as gw:
            sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0)
            ask = [{"role": "user", "content": "what time is it?"}]
            thinking = {"type": "enabled", "budget_tokens": 1024}
            async with sdk.messages.stream(
                model="claude", max_tokens=2048, messages=ask, tools=[tool], thinking=thinking
            ) as stream:
                first = await stream.get_final_message()
            kinds = [block.type for block in first.content]
            use = first.content[-1]
            assert use.type == "tool_use"
            history = [
                *ask,
                {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "10:42"}]},
            ]  # fmt: skip
            second = await sdk.messages.create(
                model="claude", max_tokens=2048, messages=history, tools=[tool]
            )
            await sdk.close()
    assert kinds == ["thinking", "tool_use"] and first.stop_reason == "tool_use"
    assert first.content[0].signature  # type: ignore[union-attr]
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"
    assert "the tool said: 10:42" in second.content[0].text  # type: ignore[union-attr]


async def test_the_mock_plays_azure_and_bedrock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cloud configs tried offline: a `mock:` provider with `azure:` checks the api-version and
    the key; one with `bedrock:` takes the signed call and answers in Bedrock's binary event
    stream, which the gateway decodes (issue 22)."""
    for name, value in (("AWS_ACCESS_KEY_ID", "AKIDMOCK"), ("AWS_SECRET_ACCESS_KEY", "mock"),
                        ("AZ_KEY", "az-mock-key")):  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    providers = {
        "az": {"mock": {}, "azure": {"api_version": "2024-10-21"}, "api_key_env": "AZ_KEY"},
        "br": {"mock": {}, "dialect": "anthropic", "bedrock": {"region": "us-east-1"}},
    }
    routes = [{"match": "gpt", "targets": ["az/gpt-4o"]},
              {"match": "claude", "targets": ["br/anthropic.claude-x-v1:0"]}]  # fmt: skip
    with trio.fail_after(20):
        async with live_gateway({}, extra_providers=providers, routes=routes) as gw:
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            azure = await sdk.chat.completions.create(model="gpt", messages=HELLO)
            translated = await sdk.chat.completions.create(model="claude", messages=HELLO)
            await sdk.close()
            claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
            async with claude.messages.stream(model="claude", max_tokens=50, messages=HELLO) as s:
                streamed = await s.get_final_message()
            tool = {"name": "read_clock", "input_schema": {"type": "object", "properties": {}}}
            async with claude.messages.stream(
                model="claude", max_tokens=50, messages=HELLO, tools=[tool]
            ) as s:
                called = await s.get_final_message()  # a tool_use block, from the event stream
            await claude.close()
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            azure_call = await sdk.chat.completions.create(
                model="gpt", messages=HELLO, tools=[CLOCK]
            )
            bedrock_call = await sdk.chat.completions.create(
                model="claude", messages=HELLO, tools=[CLOCK]
            )
            await sdk.close()
    assert called.content[-1].type == "tool_use" and called.stop_reason == "tool_use"
    assert azure_call.choices[0].message.tool_calls[0].function.name == "read_clock"  # type: ignore[index]
    assert bedrock_call.choices[0].message.tool_calls[0].function.name == "read_clock"  # type: ignore[index]
    assert (
        azure.choices[0].message.content == "[az] word0 word1 word2 word3 word4 word5 word6 word7"
    )
    assert translated.choices[0].message.content.startswith("[br] word0")
    assert streamed.content[0].text.startswith("[br] word0")  # type: ignore[union-attr]


async def test_a_cut_drops_the_connection_and_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`cut_rate` cuts an answer mid-body, streamed or not: the gateway sees the connection drop.
    The mock leaves its response unfinished rather than raising through the server, so the
    demo's log has no traceback for a fault it plays on purpose."""
    extra = {"cuts": {"mock": {"cut_rate": 1.0, "chunks": 6}}}
    routes = [{"match": "*", "targets": ["cuts/m"]}]
    with trio.fail_after(20):
        async with live_gateway({}, routes, extra_providers=extra) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as http:
                body = {"model": "gpt", "messages": HELLO}
                whole = await http.post("/v1/chat/completions", json=body)
                streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
    assert whole.status_code == 502
    assert {a["error_type"] for a in whole.json()["error"]["attempts"]} == {"stream_cut"}
    assert streamed.status_code == 200 and '"code": "stream_cut"' in streamed.text
    assert "[DONE]" not in streamed.text
    assert "Error in ASGI Framework" not in caplog.text


async def test_a_stall_never_answers_and_ends_when_its_client_leaves() -> None:
    """`stall_rate` takes the request and never answers; once the client (the gateway, which
    gave up on it) has gone, the mock's request ends and its socket closes. It used to sleep
    forever: every stall left a socket in CLOSE_WAIT, and a long fault mix ran the process
    that hosts the demo's mocks out of file descriptors."""
    mock = MockUpstream(MockSettings(stall_rate=1.0))
    ended = trio.Event()

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        try:
            await mock(scope, receive, send)
        finally:
            if scope["type"] == "http":
                ended.set()

    body = json.dumps({"model": "m", "messages": HELLO}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json"
        b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_asgi, app, "127.0.0.1", 0)
            # A plain socket: on loopback, connecting and sending a small request do not block.
            client = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            try:
                client.sendall(request)
                await trio.testing.wait_all_tasks_blocked()
                assert mock.requests == 1  # taken, and stalled:
                with pytest.raises(BlockingIOError):  # nothing was answered
                    client.recv(1, socket.MSG_DONTWAIT)
                assert not ended.is_set()
            finally:
                client.close()
            await ended.wait()
            nursery.cancel_scope.cancel()
