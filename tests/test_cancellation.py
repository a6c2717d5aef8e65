"""Structured cancellation end to end: a client that leaves takes its upstream call with it.

For each phase an upstream call can be in, a fake upstream on loopback records when the gateway
closes its connection; the test drops the client and checks that the upstream saw the close, that
the actor's in-flight count is back to zero, and which phase the metric recorded.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from actors.provider import ProviderActor
from router.face.app import App
from router.serving.server import Running
from tests.helpers import (
    Upstream,
    asgi_client,
    chat,
    config,
    eventually,
    gateway,
    stall,
    status,
)
from tests.live import Exchange, Face, FakeUpstream, chunk_event, faces, live_gateway


async def in_phase(actor: ProviderActor, phase: str) -> bool:
    """Whether the actor's one call in flight is in `phase` (its own snapshot says)."""
    return dict((await actor.ask_snapshot()).phases) == {phase: 1}


async def eventually_async(predicate: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """`eventually` for a predicate that must ask (an actor's snapshot is a message away)."""
    with trio.fail_after(seconds):
        while not await predicate():  # noqa: ASYNC110 (the state has no event; see eventually)
            await trio.sleep(0.01)


def cancelled(gw: Running, provider: str, phase: str) -> float:
    value = gw.app.gateway.metrics.registry.get_sample_value(
        "cascade_upstream_cancelled_total", {"provider": provider, "phase": phase}
    )
    return value or 0.0


async def client_leaves(
    gw: Running,
    body: dict[str, Any],
    ready: Callable[[], Awaitable[None]],
    endpoint: str = "/v1/chat/completions",
) -> None:
    """Send `body`, wait until `ready()` returns, then drop the client connection.

    The request task ends (cancelled, closing its response) before the client closes its pool:
    in the other order the pool could close the socket under the task's pending read, which then
    failed with ReadError instead of being cancelled (seen once in CI)."""
    async with httpx.AsyncClient(base_url=gw.url) as client, trio.open_nursery() as nursery:

        async def request() -> None:
            async with client.stream("POST", endpoint, json=body) as response:
                async for _ in response.aiter_raw():
                    pass

        nursery.start_soon(request)
        await ready()
        nursery.cancel_scope.cancel()


async def no_headers(exchange: Exchange) -> None:
    await exchange.wait_disconnect()


async def headers_only(exchange: Exchange) -> None:
    stream = exchange.json.get("stream")
    await exchange.start(200, "text/event-stream" if stream else "application/json")
    await exchange.wait_disconnect()


async def mid_body(exchange: Exchange) -> None:
    if exchange.json.get("stream"):
        await exchange.start(200, "text/event-stream")
        await exchange.body_part(chunk_event("first"))
    else:
        await exchange.start(200)
        await exchange.body_part(b'{"id": "partial')
    await exchange.wait_disconnect()


@pytest.mark.parametrize(
    ("handler", "stream", "phase"),
    [
        (no_headers, False, "headers"),
        (no_headers, True, "headers"),
        (headers_only, False, "first_byte"),
        (headers_only, True, "first_byte"),
        (mid_body, False, "streaming"),
        (mid_body, True, "streaming"),
    ],
)
@faces
async def test_client_disconnect_closes_the_upstream_call(
    handler: Any, stream: bool, phase: str, face: Face
) -> None:
    up = FakeUpstream(handler)
    with trio.fail_after(15):
        async with live_gateway({"a": up}, providers={"a": {"dialect": face.name}}) as gw:
            actor = gw.actors["a"]

            async def upstream_in_phase() -> None:
                await eventually(lambda: len(up.exchanges) == 1)  # the upstream has the request
                # The actor's own view of its call (headers sent, or read, or a first body byte).
                await eventually_async(lambda: in_phase(actor, phase))

            await client_leaves(gw, face.body(stream), upstream_in_phase, face.endpoint)
            with trio.fail_after(2):
                await up.exchanges[0].closed.wait()  # the upstream saw its connection close
            await eventually(lambda: actor.in_flight == 0)
            assert cancelled(gw, "a", phase) == 1


async def test_disconnect_while_connecting() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connect() hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        try:
            with trio.fail_after(15):
                async with live_gateway(
                    {},
                    routes=[{"match": "gpt", "targets": ["full/m"]}],
                    extra_providers={"full": {"base_url": f"http://127.0.0.1:{port}/v1"}},
                ) as gw:
                    actor = gw.actors["full"]

                    async def connecting() -> None:
                        await eventually_async(lambda: in_phase(actor, "connect"))

                    await client_leaves(gw, chat(), connecting)
                    await eventually(lambda: actor.in_flight == 0)
                    assert cancelled(gw, "full", "connect") == 1
        finally:
            for s in fillers:
                s.close()


async def test_disconnect_during_backoff_starts_no_further_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """In virtual time: the client leaves 10 s into a 30 s backoff; at 100 s there has still
    been one upstream call, and the backoff was counted as the cancelled phase."""
    up = Upstream(status(503))
    retry = {"strategy": "same_model", "backoff": {"base": "30s", "max": "30s", "jitter": "none"}}
    async with gateway(config(["a"], [{"match": "gpt", "targets": ["a/m"]}], retry=retry),
                       {"a": up}) as gw:  # fmt: skip
        async with asgi_client(gw) as client:
            with trio.move_on_after(10):
                await client.post("/v1/chat/completions", json=chat())
        await trio.sleep_until(100)
        assert gw.actors["a"].in_flight == 0
        backoff = gw.metrics.registry.get_sample_value(
            "cascade_upstream_cancelled_total", {"provider": "a", "phase": "backoff"}
        )
    assert up.times == [0.0]
    assert backoff == 1


async def test_under_another_asgi_server_a_watcher_cancels_the_request() -> None:
    """Cascade's server tells the app when the client's stream closes (the `cascade.disconnect`
    scope extension, which every live test above goes through). Under a server without it,
    the app's disconnect watcher reads `http.disconnect` from receive() and cancels the request,
    its upstream call with it. Driven here as such a server would: an ASGI call, no extension."""
    up = Upstream(stall())
    async with gateway(config(["a"], [{"match": "gpt", "targets": ["a/m"]}]), {"a": up}) as gw:
        messages = [{"type": "http.request", "body": json.dumps(chat()).encode()}]
        gone = trio.Event()

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"content-type", b"application/json")], "extensions": {}}  # fmt: skip
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(App(gw), scope, receive, send)
                await trio.testing.wait_all_tasks_blocked()
                assert up.active == 1  # the upstream call waits for its answer
                gone.set()
            # The app returned by itself: the request was cancelled, nothing was written.
        assert (up.cancelled, gw.actors["a"].in_flight, sent) == (1, 0, [])


def task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            count(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return count(trio.lowlevel.current_root_task())


# The 300 *test clients* are httpx clients cancelled mid-body: httpcore closes their connections
# but leaves its inner body generators to the GC, which trio reports. Cascade's own upstream pool
# leaves none (the other tests run with every warning as an error).
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object "
    r"(AsyncHTTP11Connection|HTTP11ConnectionByteStream|PoolByteStream|AsyncResponseStream|"
    r"BoundAsyncStream|Response)\.:pytest.PytestUnraisableExceptionWarning"
)
async def test_hundreds_of_cancelled_streams_leak_nothing() -> None:
    n = 300
    up = FakeUpstream(mid_body)
    with trio.fail_after(60):
        async with live_gateway(
            {"a": up}, providers={"a": {"max_connections": n, "max_in_flight": n}}
        ) as gw:
            actor = gw.actors["a"]
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=30) as client:
                await client.get("/healthz")
                baseline = task_count()
                committed = 0

                async def one() -> None:
                    nonlocal committed
                    async with client.stream(
                        "POST", "/v1/chat/completions", json=chat(stream=True)
                    ) as r:
                        async for _ in r.aiter_raw():
                            committed += 1
                            await trio.sleep_forever()

                async with trio.open_nursery() as nursery:
                    for _ in range(n):
                        nursery.start_soon(one)
                    await eventually(lambda: committed == n, 30)
                    assert actor.in_flight == n
                    nursery.cancel_scope.cancel()  # every client leaves at once
            for exchange in up.exchanges:
                with trio.fail_after(5):
                    await exchange.closed.wait()
            await eventually(lambda: actor.in_flight == 0)
            assert cancelled(gw, "a", "streaming") == n
            await eventually(lambda: task_count() <= baseline)
