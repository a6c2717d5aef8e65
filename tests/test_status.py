"""The operator's view: /admin/status (providers, routes with the one serving, the live feed of
cascades, recorded only while someone watches) and `cascade status` over a real socket."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import trio
import trio.testing

from router.cli import main
from router.face.app import App
from tests.helpers import Upstream, chat, config, gateway, ok, status
from tests.live import Exchange, FakeUpstream, answers, live_gateway


async def test_status_shows_blocks_routes_and_the_feed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(status(429, headers={"retry-after": "30"}))
    b = Upstream(ok("from b"))
    routes = [{"match": "gpt", "targets": ["a/m"], "alternatives": ["b/m"]}]
    async with gateway(config(["a", "b"], routes), {"a": a, "b": b}) as gw:
        app = App(gw)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cascade") as client:
            await client.post("/v1/chat/completions", json=chat())  # nobody watches yet
            assert list(app.feed._entries) == []  # costs nothing when nobody is watching
            first = (await client.get("/admin/status")).json()
            await client.post("/v1/chat/completions", json=chat())
            second = (await client.get("/admin/status", params={"after": 0})).json()
    [a_state, _] = first["providers"]
    assert a_state["name"] == "a" and a_state["dialect"] == "openai"
    assert a_state["blocks"] == [{"key": "m", "reason": "rate_limited", "seconds_left": 30.0}]
    assert first["routes"] == [
        {"match": "gpt", "targets": ["a/m"], "alternatives": ["b/m"], "serving": None}
    ]
    [entry] = second["recent"]
    assert entry["served_by"] == "b/m" and entry["status"] == 200 and entry["seq"] == 1
    assert [x["error_type"] for x in entry["attempts"]] == ["refused:rate_limited"]
    assert second["routes"][0]["serving"] == "b/m"


async def test_cascade_status_prints_the_live_view(capsys: pytest.CaptureFixture[str]) -> None:
    async def limited(exchange: Exchange) -> None:
        await exchange.json_answer(429, {"error": {"message": "slow"}}, **{"retry-after": "30"})

    with trio.fail_after(20):
        async with live_gateway({"a": FakeUpstream(limited), "b": FakeUpstream(answers)}) as gw:
            once = partial(main, ["status", "--url", gw.url, "--once"])
            assert await trio.to_thread.run_sync(once) == 0  # starts the watch
            async with httpx.AsyncClient(base_url=gw.url) as client:
                await client.post("/v1/chat/completions", json=chat())
            assert await trio.to_thread.run_sync(once) == 0
    out = capsys.readouterr().out.split("providers\n")[-1]
    assert "a " in out and "m rate_limited 30s" in out
    assert "gpt" in out and "a/m > b/m" in out and "serving: b/m" in out
    assert "served by b/m  (went around: a/m http_429)" in out
