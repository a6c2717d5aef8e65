"""The operator's view: /admin/status (providers, routes with the one serving, the live feed of
cascades, recorded only while someone watches) and `cascade status` over a real socket."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

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


async def test_cascade_status_finds_the_gateway_from_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cascade status --config FILE` reads the address and the admin token's variable from the
    file the gateway runs with (a gateway on 0.0.0.0 is reached on 127.0.0.1)."""
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", "s3cret")
    token = {"admin_token_env": "CASCADE_ADMIN_TOKEN"}
    with trio.fail_after(20):
        async with live_gateway({"a": FakeUpstream(answers)}, server=token) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            path = tmp_path / "cascade.yaml"
            routes = [{"match": "gpt", "targets": ["a/m"]}]
            raw = {
                "server": {"host": "0.0.0.0", "port": port, **token},
                "providers": {"a": {"base_url": "http://127.0.0.1:1/v1"}},
                "routes": routes,
            }
            path.write_text(json.dumps(raw))
            once = partial(main, ["status", "--config", str(path), "--once"])
            assert await trio.to_thread.run_sync(once) == 0  # the token went with it
            bare = partial(main, ["status", "--url", gw.url, "--once"])
            assert await trio.to_thread.run_sync(bare) != 0  # without it: refused
    assert "a/m" in capsys.readouterr().out


def test_cascade_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == "cascade 0.1.0"
