"""A stream is complete when its dialect says so (OpenAI: a choice's finish_reason; Anthropic:
message_stop), not when its body ends. An upstream that ends its body cleanly mid-answer has
failed: before the first byte the cascade fails over, after it the client's stream ends with an
in-band error and without the dialect's end (`[DONE]`, `message_stop`), in every dialect pair.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from tests.helpers import Upstream, asgi_client, chat, chunk, config, gateway, sse_data, stream
from tests.live import (
    ANTHROPIC,
    OPENAI,
    Exchange,
    Face,
    FakeUpstream,
    anthropic_events,
    chunk_event,
    healthy,
    live_gateway,
)

WORDS = ["one ", "two ", "three ", "four "]


def cut_short(dialect: str) -> bytes:
    """An answer's events up to its fourth word, and nothing that ends it."""
    if dialect == "openai":
        return b"".join(chunk_event(word) for word in WORDS)
    events = anthropic_events(WORDS, "m")
    return b"".join(events[:-3])  # no content_block_stop, message_delta, message_stop


def upstream_dialect(name: str) -> dict[str, Any]:
    return {"dialect": name} if name == "anthropic" else {}


pairs = pytest.mark.parametrize(
    ("client", "upstream"),
    [(OPENAI, "openai"), (OPENAI, "anthropic"), (ANTHROPIC, "anthropic"), (ANTHROPIC, "openai")],
    ids=["openai-openai", "openai-anthropic", "anthropic-anthropic", "anthropic-openai"],
)


@pairs
async def test_a_clean_end_mid_answer_after_the_first_byte_is_an_in_band_error(
    client: Face, upstream: str
) -> None:
    first_byte_seen = trio.Event()

    async def ends_early(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        events = cut_short(upstream)
        await exchange.body_part(events)
        await first_byte_seen.wait()  # the gateway has committed the stream to its client
        await exchange.body_part(b"", more=False)  # a clean end of the body, mid-answer

    up = FakeUpstream(ends_early)
    with trio.fail_after(20):
        async with (
            live_gateway({"a": up}, providers={"a": upstream_dialect(upstream)}) as gw,
            httpx.AsyncClient(base_url=gw.url) as http,
            http.stream("POST", client.endpoint, json=client.body(stream=True)) as r,
        ):
            body = b""
            async for piece in r.aiter_raw():
                body += piece
                first_byte_seen.set()
    text = body.decode()
    data = sse_data(text)
    assert r.status_code == 200
    assert "two " in text  # what was relayed stays relayed
    if client is OPENAI:
        assert "[DONE]" not in data
        assert json.loads(data[-1])["error"]["code"] == "stream_incomplete"
        assert not any(
            json.loads(d).get("choices", [{}])[0].get("finish_reason") for d in data[:-1]
        )
    else:
        assert "event: message_stop" not in text
        assert "event: message_delta" not in text  # no made-up stop_reason
        assert text.rstrip().split("\n")[-2] == "event: error"
    assert "incomplete" in data[-1] or "before the answer was complete" in data[-1]


@pairs
async def test_a_clean_end_mid_answer_before_the_first_byte_fails_over(
    client: Face, upstream: str
) -> None:
    async def ends_early(exchange: Exchange) -> None:
        events = cut_short(upstream)  # the whole short body in one write: seen before commit
        await exchange.start(200, "text/event-stream", content_length=str(len(events)))
        await exchange.body_part(events, more=False)

    first, second = FakeUpstream(ends_early), FakeUpstream(healthy)
    providers = {"a": upstream_dialect(upstream), "b": upstream_dialect(upstream)}
    with trio.fail_after(20):
        async with (
            live_gateway({"a": first, "b": second}, providers=providers) as gw,
            httpx.AsyncClient(base_url=gw.url) as http,
        ):
            r = await http.post(client.endpoint, json=client.body(stream=True))
    assert client.served_ok(r, stream=True), r.text
    assert r.headers["x-cascade-provider"] == "b"
    assert r.headers["x-cascade-attempts"] == "2"
    assert "four" not in r.text  # nothing of the failed attempt reached the client


async def test_the_actor_counts_an_incomplete_stream_as_a_failed_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Through httpx's MockTransport (virtual time): content, no finish_reason, a clean end."""
    a = Upstream(stream([chunk("a"), chunk("b")], interval=0.1, done=False))
    async with gateway(config(["a"], [{"match": "gpt", "targets": ["a/m"]}]), {"a": a}) as gw:
        async with asgi_client(gw) as http:
            r = await http.post("/v1/chat/completions", json=chat(stream=True))
        outcome = gw.metrics.registry.get_sample_value(
            "cascade_upstream_attempts_total", {"provider": "a", "outcome": "transient"}
        )
    data = sse_data(r.text)
    assert json.loads(data[-1])["error"]["code"] == "stream_incomplete"
    assert outcome == 1  # a failure (retried as a cut would be), not an "ok"


async def test_done_without_a_finish_reason_is_not_a_complete_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`[DONE]` ends an OpenAI stream, but only a finish_reason completes the answer."""
    a = Upstream(stream([chunk("a"), chunk("b")], interval=0.1))  # then [DONE], no finish
    async with gateway(config(["a"], [{"match": "gpt", "targets": ["a/m"]}]), {"a": a}) as gw:
        async with asgi_client(gw) as http:
            r = await http.post("/v1/chat/completions", json=chat(stream=True))
    data = sse_data(r.text)
    assert "[DONE]" not in data
    error = json.loads(data[-1])["error"]
    assert "before the answer was complete" in error["message"]
    assert error["code"] == "stream_incomplete"  # as for a body that ends early
