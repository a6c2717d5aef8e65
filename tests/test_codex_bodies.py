"""The Codex CLI's real request bodies (tests/fixtures/codex/, captured from `codex exec`:
developer messages of input_text parts, 8 function tools and a namespace tool, web_search,
reasoning.summary, include, store false, prompt_cache_key, client_metadata; its tool-output turn
with the function_call and function_call_output items), served through /v1/responses by a
provider of each dialect, translated (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.live import FakeUpstream, healthy, live_gateway

FIXTURES = Path(__file__).parent / "fixtures" / "codex"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


async def serve(
    body: dict[str, Any], dialect: str, drop: bool
) -> tuple[httpx.Response, FakeUpstream]:
    up = FakeUpstream(healthy)
    with trio.fail_after(20):
        async with live_gateway(
            {"up": up},
            providers={"up": {"dialect": dialect, "drop_params": drop}},
            routes=[{"match": "*", "targets": ["up/upstream-model"]}],
        ) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                answer = await client.post("/v1/responses", json=body)
    return answer, up


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("name", NAMES)
async def test_codex_bodies_are_served_translated(name: str, dialect: str) -> None:
    body = json.loads((FIXTURES / f"{name}.json").read_text())["body"]
    refused, up = await serve(body, dialect, drop=False)
    assert refused.status_code == 400 and up.exchanges == []
    error = refused.json()["error"]
    assert error["code"] == "no_eligible_target" and "'web_search'" in error["message"]

    answer, up = await serve(body, dialect, drop=True)  # web_search dropped: served
    assert answer.status_code == 200
    events = [json.loads(x[6:]) for x in answer.text.splitlines() if x.startswith("data: ")]
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    [exchange] = up.exchanges
    sent = exchange.json
    tools = [t["function"]["name"] for t in sent["tools"]] if dialect == "openai" else [
        t["name"] for t in sent["tools"]]  # fmt: skip
    namespace = next(t for t in body["tools"] if t["type"] == "namespace")
    assert f"{namespace['name']}__{namespace['tools'][0]['name']}" in tools  # flattened
    assert "web_search" not in tools and "exec_command" in tools
    text = json.dumps(sent)
    for dropped in ("prompt_cache_key", "client_metadata", "include", "reasoning", "store"):
        assert dropped not in sent
    if name == "tool_output_turn":  # the call and its output, as the upstream's dialect says
        call = body["input"][-2]
        assert call["call_id"] in text or dialect == "anthropic"
        assert "Process exited with code 127" in text
