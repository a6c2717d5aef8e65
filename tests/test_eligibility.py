"""Per-target eligibility: a target whose dialect cannot take a request is skipped for that
request (recorded with its reason, in the log, the answer's headers and the status feed), the
route's other targets serve it, and only when none can is it a 400 naming the field and the
targets. Real sockets, fake providers of both dialects, the official SDKs (issue 19)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio

from router.serving.server import Running
from tests.live import SDK_LEFTOVERS, FakeUpstream, healthy, live_gateway

pytestmark = SDK_LEFTOVERS

HELLO = [{"role": "user", "content": "hi"}]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@asynccontextmanager
async def route_of(
    *dialects: str, drop_params: bool = False
) -> AsyncIterator[tuple[Running, list[FakeUpstream]]]:
    """Route `any` to one fake provider per dialect given, in that order."""
    names = [f"{d}{i}" for i, d in enumerate(dialects)]
    ups = [FakeUpstream(healthy) for _ in dialects]
    with trio.fail_after(20):
        async with live_gateway(
            dict(zip(names, ups, strict=True)),
            providers={
                n: {"dialect": d, "drop_params": drop_params}
                for n, d in zip(names, dialects, strict=True)
            },
            routes=[{"match": "any", "targets": [f"{n}/m" for n in names]}],
        ) as gw:
            yield gw, ups


async def test_structured_output_skips_the_anthropic_target_and_the_openai_one_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "cascade")
    async with route_of("anthropic", "openai") as (gw, (claude, gpt)):
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        raw = await sdk.chat.completions.with_raw_response.create(
            model="any", messages=HELLO, response_format=SCHEMA, seed=3, n=1
        )
        await sdk.close()
    assert raw.headers["x-cascade-provider"] == "openai1"
    assert raw.headers["x-cascade-skipped"] == "anthropic0/m"
    assert raw.headers["x-cascade-attempts"] == "1"  # upstream calls: the skip made none
    assert claude.exchanges == []  # nothing reached the provider that could not take it
    [sent] = gpt.exchanges
    assert sent.json["response_format"] == SCHEMA  # same dialect: the client's own bytes
    skip = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skip and "anthropic0/m" in skip[0] and "'response_format'" in skip[0]


async def test_when_no_target_can_take_it_the_400_names_the_field_and_the_targets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "cascade")
    async with route_of("anthropic", "anthropic") as (gw, ups):
        async with httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post(
                "/v1/chat/completions",
                json={"model": "any", "messages": HELLO, "n": 3},
            )
            metrics = (await client.get("/metrics")).text
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "no_eligible_target"
    assert error["param"] == "n"
    assert "anthropic0/m" in error["message"] and "anthropic1/m" in error["message"]
    assert [a["error_type"] for a in error["attempts"]] == ["ineligible", "ineligible"]
    assert "'n' above 1" in error["attempts"][0]["reason"]
    assert all(up.exchanges == [] for up in ups)
    assert 'cascade_requests_total{dialect="openai",route="any",status="400"} 1.0' in metrics


async def test_an_anthropic_client_keeps_its_fields_on_anthropic_and_loses_only_droppable_ones() -> (
    None
):
    """Claude Code's shape of request (thinking, effort, context management, a system message
    mid-conversation): an OpenAI target serves it with those dropped or moved; with
    output_config.format, which OpenAI chat cannot say, the OpenAI target is skipped."""
    body: dict[str, Any] = {
        "model": "any",
        "max_tokens": 64,
        "thinking": {"type": "enabled", "budget_tokens": 32},
        "output_config": {"effort": "medium"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "answer in French"},
            {"role": "user", "content": "go"},
        ],
    }
    async with route_of("openai", "anthropic") as (gw, (gpt, claude)):
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        extras = ("output_config", "context_management")  # sent as they are, SDK or not
        first = await sdk.messages.with_raw_response.create(
            **{k: v for k, v in body.items() if k not in extras},
            extra_body={k: body[k] for k in extras},
        )
        formatted = {**body, "output_config": {"format": {"type": "json_schema", "schema": {}}}}
        second = await sdk.messages.with_raw_response.create(
            **{k: v for k, v in formatted.items() if k not in extras},
            extra_body={k: formatted[k] for k in extras},
        )
        await sdk.close()
    assert first.headers["x-cascade-provider"] == "openai0"
    [sent] = gpt.exchanges
    assert set(sent.json) == {"model", "messages", "max_tokens"}
    assert [m["role"] for m in sent.json["messages"]] == ["user", "assistant", "system", "user"]
    assert second.headers["x-cascade-provider"] == "anthropic1"
    assert second.headers["x-cascade-skipped"] == "openai0/m"
    [kept] = claude.exchanges
    assert json.loads(kept.body) == {**formatted, "model": "m"}  # the client's own bytes


async def test_drop_params_serves_on_the_target_without_the_fields_it_cannot_take() -> None:
    async with route_of("anthropic", drop_params=True) as (gw, (claude,)):
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        answer = await sdk.chat.completions.create(
            model="any", messages=HELLO, logprobs=True, frequency_penalty=0.5
        )
        await sdk.close()
    assert answer.choices[0].message.content
    [sent] = claude.exchanges
    assert "logprobs" not in sent.json and "frequency_penalty" not in sent.json
