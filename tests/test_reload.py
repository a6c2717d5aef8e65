"""Live reload: a broken config changes nothing; a good one changes only what changed."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from router.config import Config
from router.face.app import App
from router.serving.server import Running, serve
from router.web.server import serve_asgi
from tests.helpers import Upstream, asgi_client, chat, config, eventually, gateway
from tests.live import Exchange, FakeUpstream, answers


def write(
    path: Path, providers: dict[str, Any], routes: list[dict[str, Any]], **server: Any
) -> None:
    path.write_text(
        json.dumps({"server": {"port": 0, **server}, "providers": providers, "routes": routes})
    )


@asynccontextmanager
async def running(path: Path, **kwargs: Any) -> AsyncIterator[Running]:
    async with trio.open_nursery() as nursery:
        gw = await nursery.start(partial(serve, Config.from_file(path), source=path, **kwargs))
        yield gw
        nursery.cancel_scope.cancel()


async def reload(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    return await client.post("/admin/reload", headers=headers)


async def test_invalid_config_is_refused_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write(path, {"m": {"mock": {}}}, [{"match": "gpt", "targets": ["m/x"]}])
    with trio.fail_after(20):
        async with running(path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            path.write_text(
                json.dumps(
                    {"providers": {"m": {"mock": {"rate_429": 7}}}, "routes": [{"match": "gpt"}]}
                )
            )
            r = await reload(client)
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["type"] == "invalid_config"
            assert error["problems"] == [
                "providers.m.mock.rate_429: expected a number from 0 to 1, got 7",
                "routes[0].targets: needs at least one target",
            ]
            assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200


async def test_reconfigured_provider_keeps_its_blocks(tmp_path: Path) -> None:
    async def limited(exchange: Exchange) -> None:
        await exchange.json_answer(429, {"error": {"message": "slow down"}}, retry_after="300")

    a, b = FakeUpstream(limited), FakeUpstream(answers)
    path = tmp_path / "c.json"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for up in (a, b):
                up.url = await nursery.start(partial(serve_asgi, up, "127.0.0.1", 0))
            providers = {"a": {"base_url": a.url + "/v1"}, "b": {"base_url": b.url + "/v1"}}
            routes = [{"match": "gpt", "targets": ["a/m", "b/m"]}]
            write(path, providers, routes)
            async with running(path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
                await client.post(
                    "/v1/chat/completions", json=chat()
                )  # a answers 429: blocked 300 s
                providers["a"]["timeouts"] = {"first_byte": "5s"}
                write(path, providers, routes)
                r = await reload(client)
                assert r.json()["providers"] == {
                    "kept": ["b"],
                    "reconfigured": ["a"],
                    "added": [],
                    "removed": [],
                }
                r = await client.post("/v1/chat/completions", json=chat())
                assert r.headers["x-cascade-provider"] == "b"
                assert len(a.exchanges) == 1  # the block survived the reload: a was skipped
                snapshot = (await client.get("/admin/providers")).json()["providers"][0]
                assert snapshot["name"] == "a" and snapshot["blocks"][0]["reason"] == "rate_limited"
            nursery.cancel_scope.cancel()


async def test_providers_and_routes_are_added_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write(path, {"old": {"mock": {}}}, [{"match": "gpt", "targets": ["old/x"]}], port=0)
    with trio.fail_after(20):
        async with running(path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            old_actor = gw.app.gateway.actors["old"]
            write(
                path, {"new": {"mock": {}}}, [{"match": "claude", "targets": ["new/y"]}], port=1234
            )
            r = await reload(client)
            assert r.json() == {
                "status": "reloaded",
                "providers": {"kept": [], "reconfigured": [], "added": ["new"], "removed": ["old"]},
                "routes": 1,
                "restart_required": ["server.port"],
            }
            assert (await client.post("/v1/chat/completions", json=chat("gpt"))).status_code == 404
            served = await client.post("/v1/chat/completions", json=chat("claude"))
            assert served.status_code == 200 and served.headers["x-cascade-provider"] == "new"
            assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["claude"]
            with pytest.raises(trio.ClosedResourceError):
                old_actor.inbox.send_nowait(None)  # type: ignore[arg-type]


async def test_a_request_in_flight_finishes_on_its_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write(path, {"slow": {"mock": {"latency": "500ms"}}}, [{"match": "gpt", "targets": ["slow/x"]}])
    with trio.fail_after(20):
        async with running(path) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            results: list[httpx.Response] = []

            async def in_flight() -> None:
                results.append(await client.post("/v1/chat/completions", json=chat()))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)
                await eventually(lambda: gw.actors["slow"].in_flight == 1)
                write(path, {"other": {"mock": {}}}, [{"match": "other", "targets": ["other/x"]}])
                assert (await reload(client)).json()["providers"]["removed"] == ["slow"]
            assert results[0].status_code == 200 and "[slow]" in results[0].text


async def test_admin_token_guards_the_admin_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", "s3cret")
    path = tmp_path / "c.json"
    write(
        path,
        {"m": {"mock": {}}},
        [{"match": "gpt", "targets": ["m/x"]}],
        admin_token_env="CASCADE_ADMIN_TOKEN",
    )
    with trio.fail_after(20):
        async with running(path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            assert (await client.get("/admin/providers")).status_code == 401
            assert (await reload(client, authorization="Bearer wrong")).status_code == 401
            assert (
                await client.get("/admin/providers", headers={"authorization": "Bearer s3cret"})
            ).status_code == 200
            assert (await reload(client, authorization="Bearer s3cret")).status_code == 200
            assert (await client.get("/healthz")).status_code == 200  # not an admin endpoint


async def renamed_by_sighup(path: Path, client: httpx.AsyncClient) -> None:
    """Rename the route to `renamed`, send SIGHUP, and wait until the new route serves (the
    reload runs in the server's own task: polled, bounded)."""
    write(path, {"m": {"mock": {}}}, [{"match": "renamed", "targets": ["m/x"]}])
    os.kill(os.getpid(), signal.SIGHUP)
    with trio.fail_after(5):
        while True:
            r = await client.post("/v1/chat/completions", json=chat("renamed"))
            if r.status_code == 200:
                return
            await trio.sleep(0.05)


async def test_sighup_reloads(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write(path, {"m": {"mock": {}}}, [{"match": "gpt", "targets": ["m/x"]}])
    with trio.fail_after(20):
        async with (
            running(path, reload_on_sighup=True) as gw,
            httpx.AsyncClient(base_url=gw.url) as client,
        ):
            await renamed_by_sighup(path, client)


async def test_admin_token_scheme_is_case_insensitive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", "s3cret")
    path = tmp_path / "c.json"
    routes = [{"match": "gpt", "targets": ["m/x"]}]
    write(path, {"m": {"mock": {}}}, routes, admin_token_env="CASCADE_ADMIN_TOKEN")
    with trio.fail_after(20):
        async with running(path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for given in ("bearer s3cret", "BEARER s3cret"):
                r = await client.get("/admin/providers", headers={"authorization": given})
                assert r.status_code == 200
            for wrong in ("Basic s3cret", "Bearers3cret", "Bearer s3cre", "s3cret"):
                r = await client.get("/admin/providers", headers={"authorization": wrong})
                assert r.status_code == 401


async def test_without_a_token_the_admin_api_answers_only_loopback_clients() -> None:
    """No admin token configured: a client on another machine gets 403 from every admin
    endpoint (reload included); one on the machine itself is let in (issue 9.13)."""
    cfg = config(["a"], [{"match": "gpt", "targets": ["a/m"]}])
    async with gateway(cfg, {"a": Upstream()}) as gw:
        async with asgi_client(gw) as local:  # httpx's ASGI transport: client 127.0.0.1
            assert (await local.get("/admin/providers")).status_code == 200
        app = httpx.ASGITransport(App(gw), client=("203.0.113.7", 5))
        async with httpx.AsyncClient(transport=app, base_url="http://cascade") as remote:
            r = await remote.get("/admin/providers")
            assert r.status_code == 403 and "loopback" in r.json()["error"]["message"]
            assert (await remote.post("/admin/reload")).status_code == 403
            assert (await remote.get("/healthz")).status_code == 200  # not an admin endpoint


async def test_a_failed_reload_does_not_show_the_config_files_path(tmp_path: Path) -> None:
    path = tmp_path / "secret-location" / "c.json"
    path.parent.mkdir()
    write(path, {"m": {"mock": {}}}, [{"match": "gpt", "targets": ["m/x"]}])
    with trio.fail_after(20):
        async with running(path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            path.write_text("providers: [unclosed")
            r = await reload(client)
            assert r.status_code == 400
            assert "secret-location" not in r.text and str(tmp_path) not in r.text
            assert r.json()["error"]["problems"][0].startswith("the config file:1:")
            path.unlink()
            r = await reload(client)
            assert r.status_code == 400 and str(tmp_path) not in r.text


LATIN1 = "# r\xe9sum\xe9 of the change\n".encode("latin-1")


async def test_a_config_that_is_not_utf8_is_refused_by_api_and_by_sighup(tmp_path: Path) -> None:
    """A non-UTF-8 file once killed the server on SIGHUP and answered a bare 500 to the admin
    API: both now refuse it, keep serving the old config, and take the next good file."""
    path = tmp_path / "c.yaml"
    write(path, {"m": {"mock": {}}}, [{"match": "gpt", "targets": ["m/x"]}])
    good = path.read_bytes()
    with trio.fail_after(20):
        async with (
            running(path, reload_on_sighup=True) as gw,
            httpx.AsyncClient(base_url=gw.url) as client,
        ):
            path.write_bytes(LATIN1 + good)
            r = await reload(client)
            assert r.status_code == 400
            assert r.json()["error"]["problems"] == [
                "the config file:1:4: not UTF-8 (byte 0xe9); save it as UTF-8"
            ]
            os.kill(os.getpid(), signal.SIGHUP)  # refused and logged; the watcher lives on
            assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200
            await renamed_by_sighup(path, client)  # the watcher survived the bad file


async def test_a_metrics_token_guards_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a reverse proxy on the same host every client looks like loopback, and /metrics
    shows key names and spend: server.metrics_token_env puts a token on it (the admin token
    works too); other endpoints are unchanged."""
    monkeypatch.setenv("CASCADE_METRICS_TOKEN", "m3trics")
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", "s3cret")
    path = tmp_path / "c.json"
    routes = [{"match": "gpt", "targets": ["m/x"]}]
    write(
        path,
        {"m": {"mock": {}}},
        routes,
        metrics_token_env="CASCADE_METRICS_TOKEN",
        admin_token_env="CASCADE_ADMIN_TOKEN",
    )
    with trio.fail_after(20):
        async with running(path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            refused = await client.get("/metrics")
            assert refused.status_code == 401
            assert "m3trics" not in refused.text and "cascade_" not in refused.text
            assert refused.headers["www-authenticate"].startswith("Bearer")
            for wrong in ("Bearer m3tric", "Bearer s3cre", "m3trics"):
                r = await client.get("/metrics", headers={"authorization": wrong})
                assert r.status_code == 401
            for good in ("Bearer m3trics", "bearer s3cret"):
                r = await client.get("/metrics", headers={"authorization": good})
                assert r.status_code == 200 and "cascade_requests_total" in r.text
            assert (await client.get("/healthz")).status_code == 200
            # The metrics token is not the admin token.
            r = await client.get("/admin/providers", headers={"authorization": "Bearer m3trics"})
            assert r.status_code == 401
