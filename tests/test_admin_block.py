"""An operator takes a provider (or one model) out by hand and puts it back: the admin API's
block and unblock, through the real app, actors and dispatcher, in virtual time."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
import trio.testing

from router.face.app import App
from tests.helpers import Upstream, asgi_client, chat, config, gateway, ok


def two_providers() -> Any:
    return config(["a", "b"], [{"match": "gpt", "targets": ["a/m", "b/m"]}])


async def served_by(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    return r.headers["x-cascade-provider"]


async def test_block_and_unblock_by_hand(autojump_clock: trio.testing.MockClock) -> None:
    a, b = Upstream(ok("a")), Upstream(ok("b"))
    async with gateway(two_providers(), {"a": a, "b": b}) as gw, asgi_client(gw) as client:
        assert await served_by(client) == "a"
        r = await client.post(
            "/admin/providers/a/block", json={"duration": "10m", "reason": "bad answers"}
        )
        assert r.status_code == 200
        [block] = r.json()["blocks"]
        assert block == {
            "key": "*",
            "reason": "manual",
            "seconds_left": 600.0,
            "note": "bad answers",
        }
        assert await served_by(client) == "b"  # skipped without a call
        assert len(a.calls) == 1
        unblocked = await client.post("/admin/providers/a/unblock")
        assert unblocked.json()["blocks"] == []
        assert await served_by(client) == "a"
        # One model only, and a block that simply ends.
        await client.post("/admin/providers/a/block", json={"duration": 30, "model": "m"})
        assert await served_by(client) == "b"
        await trio.sleep(30)
        assert await served_by(client) == "a"
        refused = gw.metrics.registry.get_sample_value(
            "cascade_admission_refusals_total", {"provider": "a", "reason": "manual"}
        )
    assert refused == 2


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/admin/providers/nope/block", {"duration": "1m"}, 404),
        ("/admin/providers/a/block", {}, 400),
        ("/admin/providers/a/block", {"duration": "soon"}, 400),
        ("/admin/providers/a/block", {"duration": "1m", "model": 5}, 400),
        ("/admin/providers/a/block", {"duration": "1m", "reason": "x\nx"}, 400),
    ],
)
async def test_bad_block_requests(
    autojump_clock: trio.testing.MockClock, path: str, body: Any, status: int
) -> None:
    async with gateway(two_providers(), {"a": Upstream(), "b": Upstream()}) as gw:
        async with asgi_client(gw) as client:
            r = await client.post(path, json=body)
            snapshot = (await client.get("/admin/providers")).json()["providers"][0]
    assert r.status_code == status
    assert snapshot["blocks"] == []  # nothing was blocked


async def test_block_needs_the_admin_rights(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway(two_providers(), {"a": Upstream(), "b": Upstream()}) as gw:
        remote = httpx.ASGITransport(App(gw), client=("203.0.113.7", 5))
        async with httpx.AsyncClient(transport=remote, base_url="http://cascade") as client:
            r = await client.post("/admin/providers/a/block", json={"duration": "1m"})
        assert r.status_code == 403  # no admin token configured: loopback only
    monkeypatch.setenv("CASCADE_ADMIN", "s3cret")
    cfg = config(
        ["a", "b"],
        [{"match": "gpt", "targets": ["a/m"]}],
        server={"admin_token_env": "CASCADE_ADMIN"},
    )
    async with gateway(cfg, {"a": Upstream(), "b": Upstream()}) as gw, asgi_client(gw) as client:
        denied = await client.post("/admin/providers/a/block", json={"duration": "1m"})
        allowed = await client.post(
            "/admin/providers/a/block",
            json={"duration": "1m"},
            headers={"authorization": "Bearer s3cret"},
        )
    assert denied.status_code == 401 and allowed.status_code == 200
