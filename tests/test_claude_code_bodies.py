"""Claude Code's real request bodies (tests/fixtures/claude_code/, captured from the CLI: system
blocks with cache_control, its tools, thinking adaptive and enabled, output_config,
context_management, a system message mid-conversation, metadata.user_id holding JSON), served
through the gateway: byte for byte to an Anthropic provider, translated to an OpenAI one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.helpers import sse_data
from tests.live import FakeUpstream, healthy, live_gateway

FIXTURES = Path(__file__).parent / "fixtures" / "claude_code"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def fixture(name: str) -> tuple[dict[str, str], dict[str, Any]]:
    captured = json.loads((FIXTURES / f"{name}.json").read_text())
    return captured["headers"], captured["body"]


async def serve(name: str, dialect: str) -> tuple[httpx.Response, FakeUpstream, bytes]:
    headers, body = fixture(name)
    raw = json.dumps(body).encode()  # "model" comes first, as Claude Code sends it
    up = FakeUpstream(healthy)
    with trio.fail_after(20):
        async with live_gateway(
            {"up": up},
            providers={"up": {"dialect": dialect}},
            routes=[{"match": "*", "targets": ["up/upstream-model"]}],
        ) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                answer = await client.post(
                    "/v1/messages",
                    content=raw,
                    headers={**headers, "content-type": "application/json", "x-api-key": "x"},
                )
    return answer, up, raw


def blocks_with(obj: Any, key: str) -> int:
    """How many objects anywhere in `obj` have `key`."""
    if isinstance(obj, dict):
        return (key in obj) + sum(blocks_with(v, key) for v in obj.values())
    if isinstance(obj, list):
        return sum(blocks_with(v, key) for v in obj)
    return 0


@pytest.mark.parametrize("name", NAMES)
async def test_served_byte_for_byte_by_an_anthropic_provider(name: str) -> None:
    answer, up, raw = await serve(name, "anthropic")
    assert answer.status_code == 200
    assert '"message_stop"' in sse_data(answer.text)[-1]
    [exchange] = up.exchanges
    model = json.loads(raw)["model"]
    expected = raw.replace(json.dumps(model).encode(), b'"upstream-model"', 1)
    assert exchange.body == expected  # thinking, cache_control, context_management, all of it
    assert exchange.headers["anthropic-beta"] == fixture(name)[0]["anthropic-beta"]


@pytest.mark.parametrize("name", NAMES)
async def test_translated_for_an_openai_provider(name: str) -> None:
    answer, up, raw = await serve(name, "openai")
    assert answer.status_code == 200
    events = sse_data(answer.text)
    assert '"message_start"' in events[0] and '"message_stop"' in events[-1]
    [exchange] = up.exchanges
    sent = exchange.json
    body = json.loads(raw)
    assert "anthropic-beta" not in exchange.headers
    assert set(sent) == {"model", "messages", "max_tokens", "tools", "user", "stream",
                         "stream_options"}  # fmt: skip
    assert sent["max_tokens"] == body["max_tokens"] and sent["user"] == body["metadata"]["user_id"]
    assert [t["function"]["name"] for t in sent["tools"]] == [t["name"] for t in body["tools"]]
    for key in ("cache_control", "thinking", "signature"):
        assert blocks_with(sent, key) == 0
    roles = [m["role"] for m in sent["messages"]]
    assert roles[0] == "system"  # the system blocks, joined
    source_roles = [m["role"] for m in body["messages"]]
    if "system" in source_roles:  # a system message mid-conversation keeps its place
        assert roles.index("system", 1) == 1 + source_roles.index("system")
    if "assistant" in source_roles:  # thinking dropped, the tool call and its result kept
        call = next(m for m in sent["messages"] if m["role"] == "assistant")["tool_calls"][0]
        result = next(m for m in sent["messages"] if m["role"] == "tool")
        assert result["tool_call_id"] == call["id"]
