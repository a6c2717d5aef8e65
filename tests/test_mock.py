"""The mock upstream (demo providers, `cascade mock`) answers what a tool-using application asks:
tool calls (streamed arguments in several deltas), JSON mode, n choices, max_tokens. Driven by the
official openai SDK through the gateway, as an application trying the demo would."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import trio

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
