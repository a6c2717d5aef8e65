"""Hedged requests, in exact virtual time: when a hedge starts, who wins, what is cancelled."""

from __future__ import annotations

from typing import Any

import trio
import trio.lowlevel
import trio.testing

from tests.helpers import Upstream, asgi_client, chat, chunk, config, gateway, ok, sse_data, stream


def hedged(*targets: str, **hedge: Any) -> list[dict[str, Any]]:
    return [
        {"match": "gpt", "targets": list(targets), "hedge": {"after": "2s", "budget": 1.0, **hedge}}
    ]


async def post(gw: Any, body: dict[str, Any] | None = None) -> Any:
    async with asgi_client(gw) as client:
        return await client.post("/v1/chat/completions", json=body or chat())


def hedges(gw: Any, outcome: str) -> float:
    value = gw.metrics.registry.get_sample_value(
        "cascade_hedges_total", {"route": "gpt", "outcome": outcome}
    )
    return value or 0.0


async def test_hedge_starts_at_after_and_the_winner_cancels_the_loser(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Upstream(ok("slow a", delay=5)), Upstream(ok("fast b", delay=1))
    async with gateway(config(["a", "b"], hedged("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw)
        assert trio.current_time() == 3.0
        await trio.lowlevel.checkpoint()
        assert gw.actors["a"].in_flight == gw.actors["b"].in_flight == 0
    assert r.json()["choices"][0]["message"]["content"] == "fast b"
    assert b.times == [2.0]
    assert a.cancel_times == [3.0]  # the loser's upstream call ends the moment the winner wins
    assert (hedges(gw, "won"), hedges(gw, "lost")) == (1, 0)


async def test_first_attempt_can_still_win_after_the_hedge_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Upstream(ok("a", delay=3)), Upstream(ok("b", delay=5))
    async with gateway(config(["a", "b"], hedged("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw)
    assert r.json()["choices"][0]["message"]["content"] == "a"
    assert b.times == [2.0] and b.cancel_times == [3.0]
    assert hedges(gw, "lost") == 1


async def test_no_hedge_when_the_first_attempt_answers_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Upstream(ok("a", delay=1.9)), Upstream(ok("b"))
    async with gateway(config(["a", "b"], hedged("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw)
    assert r.json()["choices"][0]["message"]["content"] == "a"
    assert b.calls == []
    assert hedges(gw, "won") == hedges(gw, "lost") == hedges(gw, "skipped") == 0


async def test_hedge_skips_a_target_that_admission_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, c = Upstream(ok("a", delay=5)), Upstream(ok("b")), Upstream(ok("c", delay=1))
    cfg = config({"a": {}, "b": {"limits": {"rpm": 1}}, "c": {}}, hedged("a/m", "b/m", "c/m"))
    async with gateway(cfg, {"a": a, "b": b, "c": c}) as gw:
        await post(gw, chat("b/m"))  # uses b's one request this minute
        r = await post(gw)
    assert r.json()["choices"][0]["message"]["content"] == "c"
    assert len(b.calls) == 1  # the hedge did not reach b
    assert c.times == [2.0]


async def test_hedge_budget_is_respected(autojump_clock: trio.testing.MockClock) -> None:
    a, b = Upstream(ok("a", delay=5)), Upstream(ok("b", delay=1))
    async with gateway(
        config(["a", "b"], hedged("a/m", "b/m", budget=0.5, min_hedges=0)), {"a": a, "b": b}
    ) as gw:
        served = []
        for _ in range(4):
            served.append((await post(gw)).headers["x-cascade-provider"])
    # Hedged requests may be at most half of the route's requests: the 2nd and the 4th.
    assert served == ["a", "b", "a", "b"]
    assert (hedges(gw, "won"), hedges(gw, "skipped")) == (2, 2)


async def test_hedge_after_p95_uses_the_targets_observed_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(*[ok("a", delay=0.5)] * 4, ok("slow a", delay=10))
    b = Upstream(ok("b", delay=0.25))
    async with gateway(
        config(["a", "b"], hedged("a/m", "b/m", after="p95")), {"a": a, "b": b}
    ) as gw:
        for _ in range(4):
            await post(gw, chat("a/m"))  # direct to a: no hedging while it learns its latency
        start = trio.current_time()
        r = await post(gw)
    assert r.json()["choices"][0]["message"]["content"] == "b"
    assert b.times == [start + 0.5]  # a's first-byte p95 was 0.5 s


async def test_streams_hedge_on_the_first_event(autojump_clock: trio.testing.MockClock) -> None:
    a = Upstream(stream([chunk("from a", finish="stop")], first_delay=5))
    b = Upstream(stream([chunk("from b", finish="stop")], first_delay=1))
    async with gateway(config(["a", "b"], hedged("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw, chat(stream=True))
    assert "from b" in r.text and sse_data(r.text)[-1] == "[DONE]"
    cancelled = gw.metrics.registry.get_sample_value(
        "cascade_upstream_cancelled_total", {"provider": "a", "phase": "first_byte"}
    )
    assert cancelled == 1


async def test_a_quiet_route_hedges_with_the_default_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The default budget (0.1 of the route's requests) would allow no hedge before the tenth
    request of a minute; `min_hedges` (default 3 a minute) is the floor (issue 9.7)."""
    a, b = Upstream(ok("a", delay=5)), Upstream(ok("b", delay=1))
    route = [{"match": "gpt", "targets": ["a/m", "b/m"], "hedge": {"after": "300ms"}}]
    async with gateway(config(["a", "b"], route), {"a": a, "b": b}) as gw:
        served = [(await post(gw)).headers["x-cascade-provider"] for _ in range(4)]
    assert served == ["b", "b", "b", "a"]  # three hedges, then the 0.1 share of 4 requests
    assert b.times == [0.3, 1.3 + 0.3, 2.6 + 0.3]
    assert (hedges(gw, "won"), hedges(gw, "skipped")) == (3, 1)
