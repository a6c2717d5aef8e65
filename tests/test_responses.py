"""The Responses API face (`/v1/responses`), with the official openai SDK over real sockets:
text, streamed text (the SDK's stream helper raises on events out of order), function tools round
trip, parallel calls, `previous_response_id` over three turns, retrieve / delete / input items,
failover after a 429 across dialects, and a stream cut mid-answer ending with response.failed.
Served by OpenAI-dialect and Anthropic-dialect providers, translated (issue 20)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import trio

from router.serving.server import Running
from tests.live import SDK_LEFTOVERS, Exchange, FakeUpstream, answers, live_gateway, sse

pytestmark = SDK_LEFTOVERS

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}  # fmt: skip
MOCK_TEXT = "[m] word0 word1 word2 word3 word4 word5 word6 word7"


@asynccontextmanager
async def mock_of(dialect: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """An SDK client of a gateway whose every model goes to a mock provider of `dialect`."""
    with trio.fail_after(20):
        async with live_gateway(
            {},
            extra_providers={"m": {"mock": {}, "dialect": dialect}},
            routes=[{"match": "*", "targets": ["m/x"]}],
        ) as gw:
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            yield sdk
            await sdk.close()


@asynccontextmanager
async def fake(
    *handlers: Any, dialect: str = "openai"
) -> AsyncIterator[tuple[Running, FakeUpstream]]:
    up = FakeUpstream(*handlers)
    with trio.fail_after(20):
        async with live_gateway(
            {"up": up},
            providers={"up": {"dialect": dialect}},
            routes=[{"match": "*", "targets": ["up/m"]}],
        ) as gw:
            yield gw, up


both = pytest.mark.parametrize("dialect", ["openai", "anthropic"])


@both
async def test_text_plain_and_streamed(dialect: str) -> None:
    async with mock_of(dialect) as sdk:
        plain = await sdk.responses.create(model="gpt", input="hi")
        types: list[str] = []
        numbers: list[int] = []
        async with sdk.responses.stream(model="gpt", input="hi") as stream:
            async for event in stream:
                types.append(event.type)
                numbers.append(event.sequence_number)
            final = await stream.get_final_response()
    assert plain.id.startswith("resp_") and plain.status == "completed"
    assert plain.output_text == MOCK_TEXT and plain.usage is not None
    assert plain.usage.output_tokens == 8 and plain.usage.input_tokens > 0
    assert final.output_text == MOCK_TEXT and final.status == "completed"
    assert numbers == list(range(len(numbers)))  # every event numbered from 0
    deltas = types.count("response.output_text.delta")
    assert deltas >= 2
    assert types == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip


@both
async def test_a_function_tool_round_trip_continued_by_previous_response_id(dialect: str) -> None:
    async with mock_of(dialect) as sdk:
        first = await sdk.responses.create(
            model="gpt", input="what is the weather? use get_weather", tools=[WEATHER]
        )
        [call] = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "[m]"}
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
        async with sdk.responses.stream(
            model="gpt", input=[output], previous_response_id=first.id, tools=[WEATHER]
        ) as stream:
            second = await stream.get_final_response()
    assert second.output_text.startswith("[m] the tool said: sunny")
    assert second.previous_response_id == first.id


async def test_three_turns_reach_the_upstream_whole_and_are_stored() -> None:
    async with fake(answers) as (gw, up):
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        one = await sdk.responses.create(model="gpt", input="one", instructions="be brief")
        two = await sdk.responses.create(model="gpt", input="two", previous_response_id=one.id)
        three = await sdk.responses.create(
            model="gpt", input="three", previous_response_id=two.id, instructions="be terse"
        )
        fetched = await sdk.responses.retrieve(three.id)
        items = await sdk.responses.input_items.list(three.id)
        deleted = await sdk.responses.delete(one.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(one.id)
        with pytest.raises(openai.BadRequestError) as gone:
            await sdk.responses.create(model="gpt", input="x", previous_response_id=one.id)
        await sdk.close()
    messages = up.exchanges[2].json["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "be terse"),  # instructions are not carried over
        ("user", "one"), ("assistant", "answer from m"),
        ("user", "two"), ("assistant", "answer from m"),
        ("user", "three"),
    ]  # fmt: skip
    assert fetched.id == three.id and fetched.output_text == "answer from m"
    assert [i.type for i in items.data] == ["message"] * 5  # the input items, newest first
    assert deleted is None or getattr(deleted, "deleted", True)
    assert gone.value.code == "previous_response_not_found"


async def test_parallel_calls_stream_as_items_one_after_another() -> None:
    """Chat chunks that interleave two calls' arguments become two items, never interleaved."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip

    def call(index: int, **extra: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **extra}]}

    async def two_calls(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        for part in (
            chunk({"role": "assistant", **call(0, id="call_a", type="function",
                                               function={"name": "get_weather", "arguments": ""})}),
            chunk(call(1, id="call_b", type="function",
                       function={"name": "get_weather", "arguments": ""})),
            chunk(call(0, function={"arguments": '{"city": '})),
            chunk(call(1, function={"arguments": '{"city": "Rome"}'})),
            chunk(call(0, function={"arguments": '"Oslo"}'})),
            chunk({}, "tool_calls"),
        ):  # fmt: skip
            await exchange.body_part(part)
        await exchange.body_part(b"data: [DONE]\n\n", more=False)

    async with fake(two_calls) as (gw, _):
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        order: list[tuple[str, int]] = []
        async with sdk.responses.stream(model="gpt", input="both", tools=[WEATHER]) as stream:
            async for event in stream:
                if event.type.startswith(("response.output_item", "response.function_call")):
                    order.append((event.type, event.output_index))  # type: ignore[union-attr]
            final = await stream.get_final_response()
        await sdk.close()
    calls = [(i.call_id, json.loads(i.arguments)) for i in final.output]  # type: ignore[union-attr]
    assert calls == [("call_a", {"city": "Oslo"}), ("call_b", {"city": "Rome"})]
    indexes = [index for _, index in order]
    assert indexes == sorted(indexes)  # item 0 ends before item 1 begins


def rate_limited(dialect: str) -> Any:
    async def answer(exchange: Exchange) -> None:
        body = (
            {"error": {"message": "slow down", "type": "rate_limit_error"}}
            if dialect == "openai"
            else {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
        )
        await exchange.json_answer(429, body, **{"retry-after": "30"})

    return answer


@pytest.mark.parametrize(("primary", "alternative"), [("openai", "anthropic"),
                                                      ("anthropic", "openai")])  # fmt: skip
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_failover_after_a_429_across_dialects(
    primary: str, alternative: str, stream: bool
) -> None:
    up = FakeUpstream(rate_limited(primary))
    with trio.fail_after(20):
        async with live_gateway(
            {"first": up},
            providers={"first": {"dialect": primary}},
            extra_providers={"m": {"mock": {}, "dialect": alternative}},
            routes=[{"match": "*", "targets": ["first/up", "m/x"]}],
        ) as gw:
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            if stream:
                async with sdk.responses.stream(model="gpt", input="hi") as events:
                    answer = await events.get_final_response()
            else:
                answer = await sdk.responses.create(model="gpt", input="hi")
            await sdk.close()
    assert len(up.exchanges) == 1 and answer.output_text == MOCK_TEXT


async def test_a_stream_cut_mid_answer_ends_with_response_failed() -> None:
    async def cut(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        await exchange.body_part(sse({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                      "model": "m", "choices": [{"index": 0, "delta": {
                                          "role": "assistant", "content": "half an "},
                                          "finish_reason": None}]}))  # fmt: skip
        raise RuntimeError("the upstream died")  # the connection drops mid-body

    async with fake(cut) as (gw, _):
        async with httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post(
                "/v1/responses", json={"model": "gpt", "input": "hi", "stream": True}
            )
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and "[DONE]" not in r.text
    assert [e["type"] for e in events][:4] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added",
    ]  # fmt: skip
    last = events[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def test_server_tools_make_a_target_ineligible_unless_it_drops_them() -> None:
    """What Codex sends: developer instructions as input_text parts, a namespace tool, a
    web_search tool, reasoning and include options, store false, a prompt cache key."""
    body = {
        "model": "gpt",
        "instructions": "You are a coding agent.",
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "sandbox: read-only"}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "list the files; use shell"}]},
        ],
        "tools": [
            {"type": "function", "name": "shell", "strict": False,
             "parameters": {"type": "object", "properties": {"command": {"type": "array",
                            "items": {"type": "string"}}}, "required": ["command"]}},
            {"type": "namespace", "name": "mcp", "description": "tools of an MCP server",
             "tools": [{"type": "function", "name": "fetch", "parameters": {"type": "object"}}]},
            {"type": "web_search"},
        ],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "store": False, "stream": True, "prompt_cache_key": "0f1e", "client_metadata": {"x": "y"},
    }  # fmt: skip
    for drop in (False, True):
        with trio.fail_after(20):
            async with live_gateway(
                {},
                extra_providers={"m": {"mock": {}, "drop_params": drop}},
                routes=[{"match": "*", "targets": ["m/x"]}],
            ) as gw:
                async with httpx.AsyncClient(base_url=gw.url) as client:
                    r = await client.post("/v1/responses", json=body)
        if not drop:
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "tools[2]"
            assert "'web_search'" in r.json()["error"]["message"]
            continue
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: ")]
        done = events[-1]["response"]
        assert events[-1]["type"] == "response.completed"
        [item] = done["output"]
        assert item["type"] == "function_call" and item["name"] == "shell"


# --- a provider that speaks the Responses API natively -------------------------------------------


def native_response(text: str, ident: str = "resp_up1") -> dict[str, Any]:
    """A Responses answer as an OpenAI server writes it."""
    return {
        "id": ident, "object": "response", "created_at": 0, "status": "completed",
        "error": None, "incomplete_details": None, "model": "m", "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": [],
        "output": [{"type": "message", "id": "msg_up1", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": 7},
    }  # fmt: skip


def native_events(text: str) -> list[bytes]:
    """The stream an OpenAI server sends for a one-message answer."""
    done = native_response(text)
    start = {**done, "status": "in_progress", "output": [], "usage": None}
    item = done["output"][0]
    part = item["content"][0]
    events = [
        ("response.created", {"response": start}),
        ("response.in_progress", {"response": start}),
        ("response.output_item.added", {"output_index": 0,
                                        "item": {**item, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {"item_id": item["id"], "output_index": 0,
                                         "content_index": 0, "part": {**part, "text": ""}}),
        ("response.output_text.delta", {"item_id": item["id"], "output_index": 0,
                                        "content_index": 0, "delta": text}),
        ("response.output_text.done", {"item_id": item["id"], "output_index": 0,
                                       "content_index": 0, "text": text}),
        ("response.content_part.done", {"item_id": item["id"], "output_index": 0,
                                        "content_index": 0, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": done}),
    ]  # fmt: skip
    return [
        f"event: {kind}\n".encode() + sse({"type": kind, "sequence_number": n, **data})
        for n, (kind, data) in enumerate(events)
    ]


async def native(exchange: Exchange) -> None:
    if not exchange.json.get("stream"):
        await exchange.json_answer(200, native_response("native answer"))
        return
    await exchange.start(200, "text/event-stream")
    for event in native_events("native answer"):
        await exchange.body_part(event)
    await exchange.body_part(b"", more=False)


async def test_a_native_provider_gets_the_clients_bytes_and_its_answer_is_relayed() -> None:
    async with fake(native, dialect="responses") as (gw, up):
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        raw = json.dumps({"model": "gpt", "input": "hi", "metadata": {"k": "v"}}).encode()
        async with httpx.AsyncClient(base_url=gw.url) as client:
            plain = await client.post(
                "/v1/responses", content=raw, headers={"content-type": "application/json"}
            )
        async with sdk.responses.stream(model="gpt", input="hi") as stream:
            streamed = await stream.get_final_response()
        follow = await sdk.responses.create(
            model="gpt", input="and then?", previous_response_id="resp_up1"
        )
        await sdk.close()
    assert up.exchanges[0].path.endswith("/v1/responses")
    assert up.exchanges[0].body == raw.replace(b'"gpt"', b'"m"', 1)  # byte for byte
    assert plain.json() == native_response("native answer")  # relayed as it is
    assert streamed.output_text == "native answer" and streamed.id == "resp_up1"
    continued = up.exchanges[2].json  # Cascade's stored conversation, as input
    assert "previous_response_id" not in continued
    assert [i.get("role") for i in continued["input"]] == ["user", "assistant", "user"]
    assert follow.output_text == "native answer"


async def test_a_native_provider_is_skipped_for_chat_clients_and_fails_over_for_its_own() -> None:
    first = FakeUpstream(rate_limited("openai"))
    with trio.fail_after(20):
        async with live_gateway(
            {"native": first},
            providers={"native": {"dialect": "responses"}},
            extra_providers={"m": {"mock": {}, "dialect": "anthropic"}},
            routes=[{"match": "*", "targets": ["native/up", "m/x"]}],
        ) as gw:
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            chat = await sdk.chat.completions.with_raw_response.create(
                model="gpt", messages=[{"role": "user", "content": "hi"}]
            )
            answer = await sdk.responses.create(model="gpt", input="hi")
            await sdk.close()
    assert chat.headers["x-cascade-skipped"] == "native/up"  # no chat completions there
    assert len(first.exchanges) == 1  # the Responses request tried it: a 429
    assert answer.output_text == MOCK_TEXT  # then the Anthropic mock, translated
