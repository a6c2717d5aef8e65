"""Azure OpenAI as a provider (issue 22): each model a deployment under the resource's URL, the
`api-version` query, the `api-key` header (or a Bearer token), Azure's 429 with `retry-after-ms`
blocking the target that long and failing over; the official openai SDK served plain and
streamed, tools included, and an Anthropic client served across dialects."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio

from tests.live import SDK_LEFTOVERS, Exchange, FakeUpstream, healthy, live_gateway

pytestmark = SDK_LEFTOVERS

AZURE = {"api_version": "2024-10-21", "deployments": {"gpt-4o": "prod-gpt4o"}}


def azure_gateway(up: FakeUpstream, **extra: Any) -> Any:
    """The fake resource as an Azure provider (its base_url is the resource root, no /v1)."""
    return live_gateway(
        {"az": up},
        providers={"az": {"azure": {**AZURE, **extra.pop("azure", {})}, "api_key_env": "AZ_KEY"}},
        routes=[{"match": "*", "targets": ["az/gpt-4o"]}],
        **extra,
    )


@pytest.mark.parametrize("auth", ["api-key", "bearer"])
async def test_the_deployment_path_version_and_key_reach_azure(
    monkeypatch: pytest.MonkeyPatch, auth: str
) -> None:
    monkeypatch.setenv("AZ_KEY", "az-secret-123")
    up = FakeUpstream(healthy)
    with trio.fail_after(20):
        async with azure_gateway(up, azure={"auth": auth}) as gw:
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            plain = await sdk.chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hi"}]
            )
            pieces = []
            stream = await sdk.chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async with stream:
                async for chunk in stream:
                    pieces += [chunk.choices[0].delta.content or ""] if chunk.choices else []
            await sdk.close()
            claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
            message = await claude.messages.create(  # an Anthropic client, served by Azure
                model="any", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )
            await claude.close()
    assert message.content[0].text == "answer from gpt-4o"  # type: ignore[union-attr]
    first = up.exchanges[0]
    # base_url in the config ends in /v1 (the live helper's): the resource root is before it
    assert first.path.endswith("/openai/deployments/prod-gpt4o/chat/completions")
    assert first.query == "api-version=2024-10-21"
    if auth == "api-key":
        assert first.headers["api-key"] == "az-secret-123" and "authorization" not in first.headers
    else:
        assert first.headers["authorization"] == "Bearer az-secret-123"
    assert first.json["model"] == "gpt-4o"
    assert plain.choices[0].message.content == "answer from gpt-4o"
    assert "".join(pieces) == "one two three"


async def test_azures_429_blocks_for_retry_after_ms_and_fails_over() -> None:
    async def throttled(exchange: Exchange) -> None:
        error = {"error": {"code": "429", "message": "Requests to the ChatCompletions_Create"
                           " Operation have exceeded call rate limit."}}  # fmt: skip
        await exchange.json_answer(429, error, **{"retry-after-ms": "2500", "retry-after": "3"})

    az = FakeUpstream(throttled)
    with trio.fail_after(20):
        async with live_gateway(
            {"az": az},
            providers={"az": {"azure": AZURE}},
            extra_providers={"claude": {"mock": {}, "dialect": "anthropic"}},
            routes=[{"match": "*", "targets": ["az/gpt-4o", "claude/claude-x"]}],
        ) as gw:
            sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            answer = await sdk.chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hi"}]
            )
            again = await sdk.chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hi"}]
            )
            claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
            message = await claude.messages.create(
                model="any", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )
            async with httpx.AsyncClient(base_url=gw.url) as client:
                providers = (await client.get("/admin/providers")).json()["providers"]
            await sdk.close()
            await claude.close()
    assert answer.choices[0].message.content.startswith("[claude]")
    assert again.choices[0].message.content.startswith("[claude]")
    assert message.content[0].text.startswith("[claude]")  # type: ignore[union-attr]
    assert len(az.exchanges) == 1  # blocked after its 429: the next requests skip it
    [shown] = [p for p in providers if p["name"] == "az"]
    [block] = shown["blocks"]
    assert block["reason"] == "rate_limited" and 2.0 < block["seconds_left"] <= 2.5  # the ms
