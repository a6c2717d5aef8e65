"""Each row of the failure table (docs/failure-semantics.md), end to end over real sockets,
streamed and not: fake upstreams that misbehave on 127.0.0.1, the whole gateway in front of them.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import httpx
import pytest
import trio

from tests.helpers import chat, sse_data
from tests.live import (
    OPENAI,
    Exchange,
    Face,
    FakeUpstream,
    chunk_event,
    faces,
    healthy,
    live_gateway,
)

FAST = {"timeouts": {"first_byte": "300ms", "idle": "300ms"}, "max_retries": 1}
# A healthy provider keeps the default timeouts: 300 ms to a first byte flaked on a loaded CI
HEALTHY = {"max_retries": 1}
RETRY = {"backoff": {"base": "10ms", "max": "10ms", "jitter": "none"}}


def failing(status: int, body: Any = None, **headers: str) -> Any:
    async def handler(exchange: Exchange) -> None:
        await exchange.json_answer(
            status, body or {"error": {"message": f"status {status}"}}, **headers
        )

    return handler


async def stalls(exchange: Exchange) -> None:
    await trio.sleep(30)


async def run(
    a: FakeUpstream, b: FakeUpstream, stream: bool, face: Face = OPENAI, **extra: Any
) -> httpx.Response:
    dialect = {"dialect": face.name}
    providers = {"a": {**FAST, **dialect}, "b": {**HEALTHY, **dialect}}
    extra.setdefault("retry", RETRY)
    with trio.fail_after(15):
        async with live_gateway({"a": a, "b": b}, providers=providers, **extra) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                return await client.post(face.endpoint, json=face.body(stream))


def served_ok(r: httpx.Response, stream: bool) -> bool:
    return OPENAI.served_ok(r, stream)


both = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


@faces
@both
async def test_2xx_is_returned(stream: bool, face: Face) -> None:
    a, b = FakeUpstream(healthy), FakeUpstream(healthy)
    r = await run(a, b, stream, face)
    assert face.served_ok(r, stream) and r.headers["x-cascade-provider"] == "a"


@both
@pytest.mark.parametrize(
    "handler",
    [
        failing(429, retry_after="30"),
        failing(429),
        failing(529),
        failing(403, {"error": {"type": "rate_limit_error", "message": "slow down"}}),
    ],
    ids=["429-retry-after", "429-bare", "529", "403-rate-limit"],
)
@faces
async def test_rate_limits_fail_over_at_once_and_block(
    stream: bool, handler: Any, face: Face
) -> None:
    a, b = FakeUpstream(handler), FakeUpstream(healthy)
    provider = {**HEALTHY, "dialect": face.name}  # nothing stalls here
    with trio.fail_after(15):
        async with live_gateway(
            {"a": a, "b": b}, providers={"a": provider, "b": provider}, retry=RETRY
        ) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                first = await client.post(face.endpoint, json=face.body(stream))
                second = await client.post(face.endpoint, json=face.body(stream))
    assert face.served_ok(first, stream) and face.served_ok(second, stream)
    assert first.headers["x-cascade-provider"] == second.headers["x-cascade-provider"] == "b"
    assert len(a.exchanges) == 1  # blocked after the first: the second request skipped it


@faces
@both
async def test_5xx_fails_over_at_once_by_default(stream: bool, face: Face) -> None:
    a, b = FakeUpstream(failing(503)), FakeUpstream(healthy)
    r = await run(a, b, stream, face)  # strategy different_provider: the other provider first
    assert face.served_ok(r, stream) and r.headers["x-cascade-provider"] == "b"
    assert len(a.exchanges) == 1


@both
async def test_5xx_is_retried_then_failed_over_with_same_model(stream: bool) -> None:
    a, b = FakeUpstream(failing(503)), FakeUpstream(healthy)
    r = await run(a, b, stream, retry={**RETRY, "strategy": "same_model"})
    assert served_ok(r, stream) and r.headers["x-cascade-provider"] == "b"
    assert len(a.exchanges) == 2  # max_retries 1


@both
async def test_5xx_retry_can_recover_on_the_same_target(stream: bool) -> None:
    a, b = FakeUpstream(failing(500), healthy), FakeUpstream(healthy)
    retry = {**RETRY, "strategy": "same_model"}
    providers = {"a": HEALTHY, "b": HEALTHY}  # nothing stalls here
    with trio.fail_after(15):
        async with live_gateway({"a": a, "b": b}, providers=providers, retry=retry) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                r = await client.post("/v1/chat/completions", json=chat(stream=stream))
    assert served_ok(r, stream) and r.headers["x-cascade-provider"] == "a"
    assert len(a.exchanges) == 2 and len(b.exchanges) == 0


@both
async def test_connection_reset_before_headers_fails_over(stream: bool) -> None:
    async def read_then_reset(conn: trio.SocketStream) -> None:
        await conn.receive_some(65536)
        # SO_LINGER 0: close() sends a TCP RST, as a crashed upstream would.
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await conn.aclose()

    b = FakeUpstream(healthy)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, read_then_reset, 0)
            port = listeners[0].socket.getsockname()[1]
            async with live_gateway(
                {"b": b},
                routes=[{"match": "gpt", "targets": ["reset/m", "b/m"]}],
                providers={"b": HEALTHY},
                retry={**RETRY, "strategy": "same_model"},
                extra_providers={
                    "reset": {"base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 1}
                },
            ) as gw:
                async with httpx.AsyncClient(base_url=gw.url) as client:
                    r = await client.post("/v1/chat/completions", json=chat(stream=stream))
            nursery.cancel_scope.cancel()
    assert served_ok(r, stream) and r.headers["x-cascade-provider"] == "b"
    assert r.headers["x-cascade-attempts"] == "3"  # reset, retry (reset), then b


async def test_connection_refused_fails_over() -> None:
    # A port held bound and never listening: connecting is refused, and no server the test
    # starts can be given it meanwhile (a port bound and released was, once, b's own).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
        b = FakeUpstream(healthy)
        with trio.fail_after(15):
            async with live_gateway(
                {"b": b},
                routes=[{"match": "gpt", "targets": ["dead/m", "b/m"]}],
                providers={"b": HEALTHY},
                retry=RETRY,
                extra_providers={
                    "dead": {"base_url": f"http://127.0.0.1:{dead_port}/v1", "max_retries": 0}
                },
            ) as gw:
                async with httpx.AsyncClient(base_url=gw.url) as client:
                    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.headers["x-cascade-provider"] == "b"


@faces
@both
async def test_no_first_byte_fails_over(stream: bool, face: Face) -> None:
    a, b = FakeUpstream(stalls), FakeUpstream(healthy)
    r = await run(a, b, stream, face)
    assert face.served_ok(r, stream) and r.headers["x-cascade-provider"] == "b"
    assert len(a.exchanges) == 1  # a silent provider is not retried


async def test_stream_headers_then_silence_is_a_first_byte_timeout() -> None:
    async def headers_only(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        await trio.sleep(30)

    a, b = FakeUpstream(headers_only), FakeUpstream(healthy)
    r = await run(a, b, stream=True)
    assert served_ok(r, True) and r.headers["x-cascade-provider"] == "b"


async def test_stream_stall_after_commit_is_an_in_band_error() -> None:
    async def stalls_mid_stream(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        await exchange.body_part(chunk_event("partial"))
        await trio.sleep(30)

    a, b = FakeUpstream(stalls_mid_stream), FakeUpstream(healthy)
    r = await run(a, b, stream=True)
    data = sse_data(r.text)
    assert json.loads(data[-1])["error"]["code"] == "idle_timeout" and "[DONE]" not in data
    assert len(b.exchanges) == 0


@faces
@both
async def test_context_overflow_goes_to_the_larger_target(stream: bool, face: Face) -> None:
    # OpenAI says context_length_exceeded; Anthropic "prompt is too long"
    body = {
        "error": {"message": "prompt is too long: 250000 tokens", "code": "context_length_exceeded"}
    }
    a, b = FakeUpstream(failing(400, body)), FakeUpstream(healthy)
    routes = [{"match": "gpt", "targets": ["a/m"], "on_context_overflow": ["b/large"]}]
    r = await run(a, b, stream, face, routes=routes)
    assert face.served_ok(r, stream) and r.headers["x-cascade-model"] == "large"


@both
async def test_context_overflow_without_target_returns_the_error(stream: bool) -> None:
    body = {"error": {"message": "too long", "code": "context_length_exceeded"}}
    a, b = FakeUpstream(failing(400, body)), FakeUpstream(healthy)
    r = await run(a, b, stream, routes=[{"match": "gpt", "targets": ["a/m"]}])
    assert (r.status_code, r.json()) == (400, body)


@faces
@both
@pytest.mark.parametrize("status", [400, 404, 422])
async def test_request_errors_are_returned_as_they_are(
    stream: bool, status: int, face: Face
) -> None:
    body = {
        "error": {
            "message": "your request is wrong",
            "type": "invalid_request_error",
            "code": "bad",
        }
    }
    a, b = FakeUpstream(failing(status, body)), FakeUpstream(healthy)
    r = await run(a, b, stream, face)
    assert (r.status_code, r.json()) == (status, body)
    assert len(a.exchanges) == 1 and len(b.exchanges) == 0


@faces
@both
async def test_auth_failure_answers_502_without_the_providers_body(
    stream: bool, face: Face
) -> None:
    body = {
        "error": {
            "message": "Incorrect API key provided: sk-proj-***abcd",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
    a, b = FakeUpstream(failing(401, body)), FakeUpstream(healthy)
    r = await run(a, b, stream, face)
    error = r.json()["error"]
    assert r.status_code == 502
    assert (error["type"] if face is OPENAI else error["cascade_code"]) == "upstream_auth_error"
    assert "sk-" not in r.text and len(b.exchanges) == 0
