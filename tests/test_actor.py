"""The provider actor's protocol: admission, attempts, timeouts and cancellation, in virtual time."""

from __future__ import annotations

import json
from functools import partial

import attrs
import httpx
import pytest
import trio
import trio.testing

from actors.messages import (
    Attempt,
    Demand,
    Failed,
    Refused,
    Reply,
    Response,
    Snapshot,
    SnapshotRequest,
    StreamEnd,
    StreamEvents,
    StreamStart,
    UpstreamRequest,
)
from actors.provider import INBOX_SIZE, ProviderActor
from router.config import Config
from router.dialects.openai import WIRE
from router.telemetry.metrics import Metrics
from tests.helpers import TaskSteps, Upstream, chunk, ok, read_request, stall, status, stream

TERMINAL = (Refused, Response, Failed, StreamEnd)


def provider(**settings: object) -> Config:
    return Config.from_mapping(
        {
            "providers": {"p": {"base_url": "http://p.test/v1", **settings}},
            "routes": [{"match": "m", "targets": ["p/m"]}],
        }
    )


def request(stream: bool = False, model: str = "m") -> UpstreamRequest:
    body = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"stream":%s}' % (
        model.encode(),
        b"true" if stream else b"false",
    )
    return UpstreamRequest("/chat/completions", body, model, stream, estimated_tokens=10)


async def attempt(
    actor: ProviderActor, req: UpstreamRequest, scope: trio.CancelScope | None = None
) -> list[Reply]:
    send, receive = trio.open_memory_channel[Reply](16)
    await actor.inbox.send(Attempt(req, send, scope or trio.CancelScope()))
    replies: list[Reply] = []
    async with receive:
        while not replies or not isinstance(replies[-1], TERMINAL):
            replies.append(await receive.receive())
    return replies


METRICS: dict[ProviderActor, Metrics] = {}  # each started actor's registry, for the tests


async def start(nursery: trio.Nursery, upstream: Upstream, **settings: object) -> ProviderActor:
    metrics = Metrics()
    actor = ProviderActor(
        provider(**settings).providers["p"],
        metrics.provider("p"),
        wire=WIRE,
        http_transport=upstream.transport(),
        wall_clock=lambda: 0.0,
    )
    await nursery.start(actor.run)
    METRICS[actor] = metrics
    return actor


async def test_attempt_returns_the_upstream_answer_with_provider_key(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("CASCADE_TEST_KEY", "sk-abc")
    upstream = Upstream(ok("hi", delay=0.25))
    actor = await start(nursery, upstream, api_key_env="CASCADE_TEST_KEY")
    [reply] = await attempt(actor, request())
    assert isinstance(reply, Response) and reply.status == 200
    assert reply.ttfb == 0.25
    assert upstream.calls[0].headers["authorization"] == "Bearer sk-abc"
    assert actor.in_flight == 0


@pytest.mark.parametrize(
    ("value", "sent"),
    [("sk-abc\r\n", "Bearer sk-abc"), ("sk-a\nx-evil: 1", None), ("sk-\u65e5x-evil", None)],
)
async def test_key_with_control_characters_never_splits_a_header(
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
    value: str,
    sent: str | None,
) -> None:
    monkeypatch.setenv("CASCADE_TEST_KEY", value)
    upstream = Upstream(ok("hi"))
    actor = await start(nursery, upstream, api_key_env="CASCADE_TEST_KEY")
    [reply] = await attempt(actor, request())
    assert isinstance(reply, Response)
    assert upstream.calls[0].headers.get("authorization") == sent  # trimmed, or not sent at all
    assert "x-evil" not in upstream.calls[0].headers
    assert "x-evil" not in caplog.text  # the key's value is never logged
    if sent is None:
        assert "CASCADE_TEST_KEY cannot be sent in a header" in caplog.text


async def test_rate_limit_blocks_and_refusal_costs_no_call(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = Upstream(status(429, headers={"retry-after": "30"}), ok())
    actor = await start(nursery, upstream)
    [failed] = await attempt(actor, request())
    assert isinstance(failed, Failed) and failed.failure.until == 30.0
    [refused] = await attempt(actor, request())
    assert refused == Refused("rate_limited", 30.0)
    assert len(upstream.calls) == 1
    [other_model] = await attempt(actor, request(model="other"))  # scope: model
    assert isinstance(other_model, Response)
    await trio.sleep_until(30.0)
    [recovered] = await attempt(actor, request())
    assert isinstance(recovered, Response)
    assert upstream.times == [0.0, 0.0, 30.0]


async def test_cancelled_attempt_releases_its_slot(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = Upstream(stall())
    actor = await start(nursery, upstream, max_in_flight=1)
    scope = trio.CancelScope()
    send, receive = trio.open_memory_channel[Reply](4)
    await actor.inbox.send(Attempt(request(), send, scope))
    await trio.sleep(1)
    assert actor.in_flight == 1 and upstream.active == 1
    [busy] = await attempt(actor, request())
    assert busy == Refused("busy")
    scope.cancel()
    await trio.sleep(0.001)
    assert actor.in_flight == 0 and upstream.active == 0 and upstream.cancelled == 1
    receive.close()


@pytest.mark.parametrize("queued", [2, 3, INBOX_SIZE])
async def test_messages_queued_at_once_are_handled_in_one_round(
    nursery: trio.Nursery, queued: int
) -> None:
    """An actor woken for one message handles what queued behind it in the same scheduling
    round. A channel's `receive` takes a round even when it need not wait: a round per message
    capped a busy provider's new attempts at one per pass of trio's run loop."""
    actor = await start(nursery, Upstream(stall()))
    answers, answered = trio.open_memory_channel[Snapshot](queued)
    steps = TaskSteps(lambda task: task.name.endswith("ProviderActor.run"))
    await trio.testing.wait_all_tasks_blocked()  # the actor waits on its inbox
    trio.lowlevel.add_instrument(steps)
    try:
        for _ in range(queued):  # (no scheduling round between them)
            actor.inbox.send_nowait(SnapshotRequest(answers))
        await trio.testing.wait_all_tasks_blocked()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert len([answered.receive_nowait() for _ in range(queued)]) == queued
    assert steps.steps == 1


async def test_first_byte_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    actor = await start(nursery, Upstream(stall()), timeouts={"first_byte": "2s"})
    [failed] = await attempt(actor, request())
    assert isinstance(failed, Failed) and failed.failure.error_type == "first_byte_timeout"
    assert trio.current_time() == 2.0
    assert actor.in_flight == 0


async def test_total_timeout_bounds_a_slow_stream(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = Upstream(stream([chunk("a")] * 100, interval=1.0))
    actor = await start(nursery, upstream, timeouts={"idle": "5s", "total": "10s"})
    replies = await attempt(actor, request(stream=True))
    assert isinstance(replies[0], StreamStart)
    assert isinstance(replies[-1], Failed) and replies[-1].failure.error_type == "total_timeout"
    assert trio.current_time() == 10.0


async def test_stream_relays_events_then_end(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    actor = await start(
        nursery,
        Upstream(stream([chunk("a"), chunk("b", finish="stop")], first_delay=0.5, interval=0.1)),
    )
    replies = await attempt(actor, request(stream=True))
    start_reply = replies[0]
    assert isinstance(start_reply, StreamStart) and start_reply.ttfb == 0.5
    events = [e for r in replies if isinstance(r, StreamEvents | StreamStart) for e in r.events]
    assert len(events) == 3  # a, b, [DONE]
    assert isinstance(replies[-1], StreamEnd)


@pytest.mark.parametrize("relay", ["asks for more", "full reply channel"])
async def test_a_slow_client_is_not_an_idle_upstream(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, relay: str
) -> None:
    """The idle timer measures the provider, not the client: while the actor waits for the
    relaying side (to ask for more after a pile, or to take from a full reply channel), ten idle
    timeouts pass and the stream still ends as a success."""
    pieces = [chunk("a"), chunk("b") + chunk("c"), chunk("d", finish="stop")]
    actor = await start(nursery, Upstream(stream(pieces, interval=0.1)), timeouts={"idle": "1s"})
    demand = Demand() if relay == "asks for more" else None
    send, receive = trio.open_memory_channel[Reply](16 if demand is not None else 0)
    await actor.inbox.send(Attempt(request(stream=True), send, trio.CancelScope(), demand=demand))
    assert isinstance(await receive.receive(), StreamStart)
    if demand is not None:
        demand.want()
    assert len((pile := await receive.receive()).events) == 2 and isinstance(pile, StreamEvents)
    await trio.sleep(10)  # the client takes nothing more for a while
    replies: list[Reply] = []
    while not replies or not isinstance(replies[-1], TERMINAL):
        if demand is not None:
            demand.want()
        replies.append(await receive.receive())
    assert isinstance(replies[-1], StreamEnd), replies[-1]


async def test_idle_stream_fails_after_start(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    actor = await start(
        nursery, Upstream(stream([chunk("a"), chunk("b")], stall_after=1)), timeouts={"idle": "3s"}
    )
    replies = await attempt(actor, request(stream=True))
    assert isinstance(replies[0], StreamStart)
    assert isinstance(replies[-1], Failed) and replies[-1].failure.error_type == "idle_timeout"
    assert trio.current_time() == 3.0


async def test_cut_stream_fails(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    actor = await start(nursery, Upstream(stream([chunk("a"), chunk("b")], cut_after=1)))
    replies = await attempt(actor, request(stream=True))
    assert isinstance(replies[-1], Failed) and replies[-1].failure.error_type == "stream_cut"


async def test_actor_survives_a_broken_attempt(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug in a transport")

    upstream = Upstream(explode, ok())
    actor = await start(nursery, upstream)
    [failed] = await attempt(actor, request())
    assert isinstance(failed, Failed) and failed.failure.error_type == "internal_error"
    [answer] = await attempt(actor, request())
    assert isinstance(answer, Response)


async def test_rpm_limit_refuses_until_the_window_frees(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = Upstream(ok())
    actor = await start(nursery, upstream, limits={"rpm": 2})
    await attempt(actor, request())
    await trio.sleep(10)
    await attempt(actor, request())
    [refused] = await attempt(actor, request())
    assert refused == Refused("rpm", 60.0)
    await trio.sleep_until(60.0)
    [answer] = await attempt(actor, request())
    assert isinstance(answer, Response) and len(upstream.calls) == 3


async def test_tpm_estimate_is_corrected_by_usage(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    actor = await start(nursery, Upstream(ok()), limits={"tpm": 100})
    await attempt(actor, request())  # estimated 10 tokens, usage says 7
    assert actor.snapshot(trio.current_time()).tokens_last_minute == 7


async def test_circuit_opens_then_probe_closes_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = Upstream(status(503), status(503), ok())
    actor = await start(
        nursery, upstream, circuit={"failures": 2, "window": "10s", "open_for": "30s"}
    )
    await attempt(actor, request())
    await attempt(actor, request())
    [refused] = await attempt(actor, request())
    assert refused == Refused("circuit_open", 30.0)
    assert [c.state for c in actor.snapshot(1.0).circuits] == ["open"]
    await trio.sleep_until(30.0)
    [probe] = await attempt(actor, request())
    assert isinstance(probe, Response)
    assert actor.snapshot(30.0).circuits == ()
    assert upstream.times == [0.0, 0.0, 30.0]


async def test_latency_trigger_blocks_but_delivers_the_slow_answer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = Upstream(ok(delay=2.0))
    actor = await start(
        nursery,
        upstream,
        latency={"threshold": "1s", "min_triggers": 2, "window": "60s", "block": "30s"},
    )
    [first] = await attempt(actor, request())
    [second] = await attempt(actor, request())
    assert isinstance(first, Response) and isinstance(second, Response)
    [refused] = await attempt(actor, request())
    assert refused == Refused("latency", 34.0)


async def test_every_attempt_is_counted_by_outcome(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = Upstream(ok(), status(400), status(503), status(429))
    metrics = Metrics()
    actor = ProviderActor(
        provider().providers["p"],
        metrics.provider("p"),
        wire=WIRE,
        http_transport=upstream.transport(),
        wall_clock=lambda: 0.0,
    )
    await nursery.start(actor.run)
    for model in ("a", "b", "c", "d"):
        await attempt(actor, request(model=model))

    def count(outcome: str) -> float | None:
        return metrics.registry.get_sample_value(
            "cascade_upstream_attempts_total", {"provider": "p", "outcome": outcome}
        )

    assert [count(o) for o in ("ok", "client_error", "transient", "rate_limited")] == [1, 1, 1, 1]


async def test_stream_usage_corrects_tpm_when_done_follows_in_the_same_read(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 40, "total_tokens": 43}}\n\n'
    upstream = Upstream(stream([chunk("a"), usage + b"data: [DONE]\n\n"], done=False))
    actor = await start(nursery, upstream, limits={"tpm": 1000})
    await attempt(actor, request(stream=True))  # estimated 10 tokens
    assert actor.snapshot(trio.current_time()).tokens_last_minute == 43


@pytest.mark.parametrize("when", ["at_start", "mid_stream"])
async def test_dispatcher_leaving_a_stream_is_not_the_providers_fault(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
    when: str,
) -> None:
    """The dispatcher closes the reply channel (client gone, hedge lost) while events flow: the
    attempt ends as a cancellation, never as a failure counted against the provider's circuit."""
    pieces = [chunk(f"w{i}") for i in range(20)]
    upstream = Upstream(stream(pieces, interval=0.01))
    actor = await start(nursery, upstream, circuit={"failures": 1})
    for _ in range(3):
        send, receive = trio.open_memory_channel[Reply](1)
        await actor.inbox.send(Attempt(request(stream=True), send, trio.CancelScope()))
        first = await receive.receive()
        assert isinstance(first, StreamStart)
        if when == "mid_stream":
            assert isinstance(await receive.receive(), StreamEvents)
        receive.close()  # no cancel: the race where the actor sends before it sees a cancel
        with trio.fail_after(1):
            while actor.in_flight:  # noqa: ASYNC110 (virtual time: each poll is one jump)
                await trio.sleep(0.01)
    snapshot = await actor.ask_snapshot()
    assert snapshot.failures == 0 and snapshot.circuits == ()
    assert "failed unexpectedly" not in caplog.text
    [next_one] = await attempt(actor, request())  # the circuit never opened
    assert isinstance(next_one, Response)
    cancelled = METRICS[actor].registry.get_sample_value(
        "cascade_upstream_cancelled_total", {"provider": "p", "phase": "streaming"}
    )
    assert cancelled == 3


async def test_rpm_and_tpm_windows_are_bounded_without_limits(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """No rpm/tpm limit is set and nobody reads a snapshot: memory still follows the window."""
    upstream = Upstream(ok())
    actor = await start(nursery, upstream)
    for _ in range(300):
        await attempt(actor, request())
        await trio.sleep(1)
    assert len(actor.admission.rpm) <= 61 and len(actor.admission.tpm) <= 61


def _framed(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _texts(reply: Reply) -> list[str]:
    assert isinstance(reply, StreamEvents)
    return [json.loads(e.data)["choices"][0]["delta"]["content"] for e in reply.events]


@attrs.define
class _SocketStream:
    """An actor's stream from a real upstream socket on 127.0.0.1 that the test writes itself."""

    up: trio.SocketStream  # the upstream's end: the test writes the answer there
    replies: trio.MemoryReceiveChannel[Reply]
    scope: trio.CancelScope
    actor: ProviderActor
    metrics: Metrics


async def _started_stream(
    nursery: trio.Nursery, demand: Demand | None, steps: TaskSteps | None = None
) -> _SocketStream:
    """A streamed attempt whose start (its first event, w0) has been handed on; `steps`, if
    given, counts the attempt's scheduling rounds from the moment its head and w0 are sent."""
    connections_in, connections = trio.open_memory_channel[trio.SocketStream](1)

    async def upstream(stream: trio.SocketStream) -> None:
        await connections_in.send(stream)
        await trio.sleep_forever()  # the test writes the answer

    listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    config = Config.from_mapping(
        {
            "providers": {"p": {"base_url": f"http://127.0.0.1:{port}/v1"}},
            "routes": [{"match": "m", "targets": ["p/m"]}],
        }
    )
    metrics = Metrics()
    actor = ProviderActor(config.providers["p"], metrics.provider("p"), wire=WIRE)
    await nursery.start(actor.run)
    reply, replies = trio.open_memory_channel[Reply](16)
    scope = trio.CancelScope()
    await actor.inbox.send(Attempt(request(stream=True), reply, scope, demand=demand))
    up = await connections.receive()
    assert await read_request(up) is not None
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    if steps is not None:
        await trio.testing.wait_all_tasks_blocked()  # the attempt waits for the head
        trio.lowlevel.add_instrument(steps)
    await up.send_all(head + b"transfer-encoding: chunked\r\n\r\n" + _framed(chunk("w0")))
    assert isinstance(await replies.receive(), StreamStart)
    return _SocketStream(up, replies, scope, actor, metrics)


async def test_a_streams_start_is_handed_on_in_no_more_rounds_than_a_later_read(
    nursery: trio.Nursery,
) -> None:
    """The start is the attempt's first reply: it always fits the reply channel, so handing it
    on costs no scheduling round of its own (the wait for the relaying side's `Demand` that
    follows is one). From the upstream's head and first event to that wait, the attempt takes
    as many rounds as it takes for a later read that is handed on (a pile, then the same
    wait): one each, the wake by the socket. Real sockets on 127.0.0.1."""
    demand = Demand()
    steps = TaskSteps(lambda task: task.name.endswith("ProviderActor._attempt"))  # attempts
    try:
        with trio.fail_after(10):
            s = await _started_stream(nursery, demand, steps)
            await trio.testing.wait_all_tasks_blocked()
            start = steps.steps
            demand.want()  # it reads again: nothing there yet, it waits on the socket
            await trio.testing.wait_all_tasks_blocked()
            steps.steps = 0
            await s.up.send_all(_framed(chunk("w1") + chunk("w2")))  # a pile: then it waits
            await trio.testing.wait_all_tasks_blocked()
            later = steps.steps
            assert _texts(await s.replies.receive()) == ["w1", "w2"]
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert later > 0
    assert start == later


async def test_the_actor_reads_again_when_the_relay_asks_after_a_start_or_a_pile(
    nursery: trio.Nursery,
) -> None:
    """After a stream's start, and after a read that found several events (the upstream is
    ahead of the gateway), the actor reads the upstream again only when the relaying side has
    asked for more (`Demand.want`), as a relay with one task reads after its write: what arrived
    meanwhile comes in one read and one message, not an event at a time. After a read that found
    one event it reads again at once. Real sockets on 127.0.0.1; the test is the relaying side
    and writes the upstream's answer itself, each event in a write of its own."""
    demand = Demand()
    with trio.fail_after(10):
        s = await _started_stream(nursery, demand)
        replies = s.replies

        async def events(*texts: str) -> None:
            for text in texts:
                await s.up.send_all(_framed(chunk(text)))  # on loopback: in the actor's socket
            await trio.testing.wait_all_tasks_blocked()

        await events("w1", "w2", "w3")  # the start is being written: the actor waits
        assert replies.statistics().current_buffer_used == 0
        demand.want()
        assert _texts(await replies.receive()) == ["w1", "w2", "w3"]
        await events("w4", "w5")  # a pile: it waits again
        assert replies.statistics().current_buffer_used == 0
        demand.want()
        assert _texts(await replies.receive()) == ["w4", "w5"]
        demand.want()
        await events("w6")  # asked before it came: read at once, and alone
        assert _texts(await replies.receive()) == ["w6"]
        await events("w7")  # one event found: the actor reads again without being asked
        assert _texts(await replies.receive()) == ["w7"]
        await s.up.send_all(_framed(chunk("w8") + chunk("w9")))  # a pile in one read
        assert _texts(await replies.receive()) == ["w8", "w9"]
        await events("w10")
        assert replies.statistics().current_buffer_used == 0  # it waits: cancellable there
        assert s.actor.in_flight == 1
        s.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert s.actor.in_flight == 0
        cancelled = s.metrics.registry.get_sample_value(
            "cascade_upstream_cancelled_total", {"provider": "p", "phase": "streaming"}
        )
        assert cancelled == 1


async def test_without_a_demand_events_are_read_as_they_come(nursery: trio.Nursery) -> None:
    """An attempt whose relaying side does not say when it wants more (no `Demand`) is read as
    fast as its events come: after a pile too, nobody asking."""
    with trio.fail_after(10):
        s = await _started_stream(nursery, None)
        await s.up.send_all(_framed(chunk("w1") + chunk("w2")))
        assert _texts(await s.replies.receive()) == ["w1", "w2"]
        await s.up.send_all(_framed(chunk("w3") + chunk("w4")))
        assert _texts(await s.replies.receive()) == ["w3", "w4"]
        end = _framed(chunk("", finish="stop") + b"data: [DONE]\n\n") + b"0\r\n\r\n"
        await s.up.send_all(end)
        last = await s.replies.receive()
        assert isinstance(last, StreamEvents) and last.events[-1].data == b"[DONE]"
        assert isinstance(await s.replies.receive(), StreamEnd)
