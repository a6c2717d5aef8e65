"""Type confusion on every field of both faces' requests: each mutated request either parses and
translates for both upstream dialects, or is a 400 that names the field. Never another exception
(which the app would answer with a 500).

A fixed seed and a few thousand cases: each case takes one rich, valid request (tools, tool calls
and results, images, system prompts, metadata, tool_choice) and replaces one value anywhere in its
tree with a value of another type.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from router.dialects import DIALECTS
from router.dialects.anthropic import count_tokens
from router.dialects.pairs import translator
from router.dialects.translate import Crossing
from router.errors import RequestError
from tests.helpers import Upstream, asgi_client, config, gateway

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
IMAGE_URL = "data:image/png;base64,iVBORw0KGgo="

OPENAI_REQUEST: dict[str, Any] = {
    "model": "m",
    "max_tokens": 100,
    "temperature": 0.5,
    "stop": ["END"],
    "user": "u-1",
    "stream": True,
    "stream_options": {"include_usage": True},
    "parallel_tool_calls": False,
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "tools": [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "d", "parameters": SCHEMA},
        }
    ],
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "and kind"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "weather?"},
                {"type": "image_url", "image_url": {"url": IMAGE_URL}},
            ],
        },
        {
            "role": "assistant",
            "content": "checking",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ],
}

ANTHROPIC_REQUEST: dict[str, Any] = {
    "model": "m",
    "max_tokens": 100,
    "temperature": 0.5,
    "top_p": 0.9,
    "stop_sequences": ["END"],
    "stream": True,
    "metadata": {"user_id": "u-1"},
    "system": [{"type": "text", "text": "be brief"}],
    "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    "tools": [{"name": "get_weather", "description": "d", "input_schema": SCHEMA}],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "weather?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                },
                {"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "sig"},
                {"type": "text", "text": "checking"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"c": 1}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "sunny"}],
                    "is_error": False,
                },
                {"type": "text", "text": "thanks"},
            ],
        },
    ],
}

CONFUSIONS: list[Any] = [
    None,
    True,
    0,
    -1,
    7,
    1.5,
    10**30,
    "",
    "x",
    "[1,2]",
    [],
    ["x"],
    [None],
    [1, 2],
    {},
    {"a": 1},
    {"type": "x"},
]


def paths(value: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON tree (the root excluded)."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield (*here, key)
        yield from paths(child, (*here, key))


def mutated(base: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    obj = copy.deepcopy(base)
    where = rng.choice([p for p in paths(obj) if p != ("model",)])
    parent = obj
    for key in where[:-1]:
        parent = parent[key]
    replacement = rng.choice(CONFUSIONS)
    parent[where[-1]] = replacement
    return obj, f"{'.'.join(map(str, where))} = {replacement!r}"


def check(client: str, obj: dict[str, Any]) -> None:
    """Parse as `client`, then build the body for a target of each dialect; a RequestError must
    be a 4xx naming the field."""
    dialect = DIALECTS[client]
    body = json.dumps(obj).encode()
    try:
        if client == "anthropic":
            count_tokens(body)
        request = dialect.parse(body)
        for upstream in DIALECTS.values():
            if upstream is dialect:
                request.call_for(upstream, "up-model")
            else:
                translator(dialect, upstream).request(request, "up-model", Crossing())
    except RequestError as exc:
        assert 400 <= exc.status < 500, exc.message
        assert exc.param, f"no field named: {exc.message}"


@pytest.mark.parametrize("client", ["openai", "anthropic"])
def test_type_confusion_is_a_400_naming_the_field(client: str) -> None:
    base = OPENAI_REQUEST if client == "openai" else ANTHROPIC_REQUEST
    check(client, base)  # the unmutated request is fine, both ways
    rng = random.Random(24)
    for _ in range(1500):
        obj, what = mutated(base, rng)
        try:
            check(client, obj)
        except AssertionError:
            raise
        except Exception as exc:
            pytest.fail(f"{client}: {what}: {type(exc).__name__}: {exc}")


# The reported cases, through the app: a 400 in the endpoint's shape, with the request id.
REPORTED = [
    ("/v1/messages", {**ANTHROPIC_REQUEST, "stream": False, "max_tokens": None}, "max_tokens"),
    ("/v1/messages", {**ANTHROPIC_REQUEST, "stream": False, "metadata": "u-1"}, "metadata"),
    (
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": [{"type": "image", "source": "https://x/a.png"}]}
            ],
        },
        "messages[0].content[0].source",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": ["call_1"]},
            ],
        },
        "messages[1].tool_calls[0]",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": {"city": "Paris"}},
                        }
                    ],
                },
            ],
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": OPENAI_REQUEST["tools"],
            "tool_choice": {"type": "function", "function": "get_weather"},
        },
        "tool_choice.function",
    ),
]


@pytest.mark.parametrize(("path", "body", "field"), REPORTED)
async def test_reported_malformed_requests_get_a_400_in_the_dialects_shape(
    path: str, body: dict[str, Any], field: str
) -> None:
    # Both dialects' targets on the route: the request must be refused before either is called.
    cfg = config(
        {"o": {}, "a": {"dialect": "anthropic"}}, [{"match": "m", "targets": ["o/x", "a/y"]}]
    )
    upstreams = {"o": Upstream(), "a": Upstream()}
    async with gateway(cfg, upstreams) as gw, asgi_client(gw) as client:
        r = await client.post(path, json=body, headers={"x-request-id": "req-24"})
    assert r.status_code == 400, r.text
    assert r.headers["x-request-id"] == "req-24"
    error = r.json()["error"]
    if path == "/v1/messages":
        assert r.json()["type"] == "error" and error["type"] == "invalid_request_error"
        assert field in error["message"]
    else:
        assert error["type"] == "invalid_request_error" and error["param"] == field
    assert all(not u.calls for u in upstreams.values())  # nothing reached a provider


async def test_a_bug_in_the_request_path_is_a_500_in_the_dialects_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The safety net for what the fuzzing missed: an unexpected exception is logged and
    answered as a 500 in the endpoint's shape with the request id, not a dropped connection."""
    cfg = config(["o"], [{"match": "m", "targets": ["o/x"]}])

    def broken(body: bytes) -> Any:
        raise KeyError("surprise")

    monkeypatch.setattr(DIALECTS["anthropic"], "parse", broken)
    async with gateway(cfg, {"o": Upstream()}) as gw, asgi_client(gw) as client:
        r = await client.post("/v1/messages", json={}, headers={"x-request-id": "req-500"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "req-500"
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    assert "surprise" not in r.text  # internals stay in the log


@pytest.mark.parametrize(
    "answer", [b"not json", b"[]", b'{"choices": "x"}', b'{"choices": [{"message": 3}]}']
)
async def test_an_answer_that_cannot_be_translated_is_a_502(answer: bytes) -> None:
    """An OpenAI upstream's 200 that is not a chat completion, for an Anthropic client."""

    async def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})

    cfg = config(["o"], [{"match": "m", "targets": ["o/x"]}])
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    async with gateway(cfg, {"o": Upstream(garbage)}) as gw, asgi_client(gw) as client:
        r = await client.post("/v1/messages", json=body)
    assert r.status_code == 502
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
