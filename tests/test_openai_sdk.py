"""The official `openai` SDK, pointed at Cascade, gets answers streamed and not."""

from __future__ import annotations

import openai
import pytest
import trio

from tests.live import SDK_LEFTOVERS, FakeUpstream, answers, live_gateway, streams

# The SDK (and its httpx2) leave their own SSE async generators for the garbage collector once a
# stream has ended, which trio reports as ResourceWarnings. Those are the SDK's, not Cascade's.
pytestmark = SDK_LEFTOVERS


async def test_openai_sdk_non_stream_and_stream() -> None:
    async def by_mode(exchange: object) -> None:
        from tests.live import Exchange

        assert isinstance(exchange, Exchange)
        await (streams if exchange.json.get("stream") else answers)(exchange)

    with trio.fail_after(20):
        async with live_gateway({"a": FakeUpstream(by_mode)}) as gw:
            client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0)
            answer = await client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "hi"}]
            )
            pieces = []
            usage = None
            stream = await client.chat.completions.create(
                model="gpt",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for event in stream:
                    if event.choices:
                        pieces.append(event.choices[0].delta.content or "")
                    usage = event.usage or usage
            models = await client.models.list()
            retrieved = await client.models.retrieve("gpt")
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(
                    model="no-such-model", messages=[{"role": "user", "content": "hi"}]
                )
            await client.close()
    assert answer.choices[0].message.content == "answer from m"
    assert "".join(pieces) == "one two three"
    assert [m.id for m in models.data] == ["gpt"]
    assert retrieved.id == "gpt"
    assert missing.value.status_code == 404


async def test_sdk_does_not_retry_a_cascade_that_already_retried() -> None:
    """An exhausted cascade is answered with `x-should-retry: false`: the SDK's own default
    retries (two) would run the whole cascade three times for one call (issue 9.8)."""

    async def fails(exchange: object) -> None:
        from tests.live import Exchange

        assert isinstance(exchange, Exchange)
        await exchange.json_answer(503, {"error": {"message": "down", "type": "server_error"}})

    upstream = FakeUpstream(fails)
    with trio.fail_after(20):
        async with live_gateway(
            {"a": upstream}, providers={"a": {"max_retries": 1}}, retry={"backoff": {"base": 0}}
        ) as gw:
            client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-client")  # 2 retries
            with pytest.raises(openai.APIStatusError) as failed:
                await client.chat.completions.create(
                    model="gpt", messages=[{"role": "user", "content": "hi"}]
                )
            await client.close()
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.exchanges) == 2  # one cascade: the first call and its one retry
