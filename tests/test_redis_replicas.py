"""Two real Cascade processes sharing a real redis-server, against fake upstreams on 127.0.0.1
(issue 12): blocks, circuits and rpm limits learned or spent by one replica hold on the other;
Redis dying and coming back never stops answers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from router.web.server import serve_asgi
from tests.helpers import chat, start_cascade
from tests.live import Exchange, FakeUpstream, healthy
from tests.redis_server import RedisServer


class Replica:
    """One `cascade serve` process; its stderr is drained into `log`."""

    def __init__(self, proc: trio.Process, url: str, log: list[bytes]) -> None:
        self.proc, self.url, self.log = proc, url, log

    async def providers(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url) as client:
            r = await client.get("/admin/providers")
        return {p["name"]: p for p in r.json()["providers"]}

    async def chat(self, model: str = "gpt") -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=20) as client:
            return await client.post("/v1/chat/completions", json=chat(model))

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url) as client:
            return await client.get(path)

    async def state_up(self) -> bool:
        return bool((await self.get("/readyz")).json()["state"]["up"])


async def start_replica(nursery: trio.Nursery, config: Path) -> Replica:
    proc, url, log = await start_cascade(config)

    async def drain() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.receive_some():
            log.append(chunk)

    nursery.start_soon(drain)
    return Replica(proc, url, log)


async def stop(replicas: list[Replica]) -> None:
    """SIGTERM each; each must exit 0 (a replica that died or hung shows its log's tail)."""
    for r in replicas:
        r.proc.send_signal(signal.SIGTERM)
    for r in replicas:
        with trio.move_on_after(10):
            assert await r.proc.wait() == 0, b"".join(r.log).decode()[-3000:]
        if r.proc.returncode is None:
            r.proc.kill()
            raise AssertionError("replica ignored SIGTERM:\n" + b"".join(r.log).decode()[-3000:])


@asynccontextmanager
async def deployment(config: Path, count: int = 2) -> AsyncIterator[list[Replica]]:
    """`count` replicas of `config`, connected to Redis; stopped (killed if need be) at the end."""
    async with trio.open_nursery() as nursery:
        replicas: list[Replica] = []
        try:
            for _ in range(count):
                replicas.append(await start_replica(nursery, config))
            await connected(*replicas)
            yield replicas
            await stop(replicas)
        finally:
            for r in replicas:
                if r.proc.returncode is None:
                    r.proc.kill()
            nursery.cancel_scope.cancel()


def write_config(path: Path, redis_url: str, providers: dict[str, Any], **route: Any) -> Path:
    path.write_text(
        json.dumps(
            {
                "server": {"port": 0, "grace": "1s"},
                "state": {"backend": "redis", "url": redis_url, "prefix": "t:"},
                "providers": providers,
                "routes": [{"match": "gpt", **route}],
            }
        )
    )
    return path


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Poll another process's state (no event crosses the process boundary), bounded in time."""
    with trio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110
            await trio.sleep(0.005)


async def connected(*replicas: Replica) -> None:
    for r in replicas:
        await until(r.state_up, 10)


async def test_a_429_on_one_replica_steers_the_other_within_100ms(
    tmp_path: Path, redis: RedisServer
) -> None:
    sent_429: list[float] = []

    async def rate_limited(exchange: Exchange) -> None:
        sent_429.append(time.time())
        await exchange.json_answer(
            429, {"error": {"type": "rate_limit_error", "message": "slow down"}}, retry_after="30"
        )

    primary, other = FakeUpstream(rate_limited, healthy), FakeUpstream(healthy)
    async with trio.open_nursery() as nursery:
        urls = [await nursery.start(serve_asgi, u, "127.0.0.1", 0) for u in (primary, other)]
        providers = {"up": {"base_url": urls[0] + "/v1"}, "alt": {"base_url": urls[1] + "/v1"}}
        config = write_config(tmp_path / "c.yaml", redis.url, providers, targets=["up/m", "alt/m"])
        async with deployment(config) as (a, b):
            assert (await a.chat()).status_code == 200  # up said 429, alt served
            assert len(primary.exchanges) == 1

            # B learns it from A through Redis. The time from the upstream's 429 to B holding
            # the block is taken in B itself (wall clock; both on this machine).
            async def b_knows() -> bool:
                return bool((await b.providers())["up"]["blocks"])

            await until(b_knows)
            up_on_b = (await b.providers())["up"]
            assert [(x["key"], x["reason"]) for x in up_on_b["blocks"]] == [("m", "rate_limited")]
            assert 29 <= up_on_b["blocks"][0]["seconds_left"] <= 30
            lag = up_on_b["shared"]["last_event_at"] - sent_429[0]
            print(f"429 at the upstream -> block known on the other replica: {lag * 1000:.1f} ms")
            assert lag <= 0.1

            assert (await b.chat()).status_code == 200  # B skips `up` without calling it
            assert len(primary.exchanges) == 1
            assert len(other.exchanges) == 2
        nursery.cancel_scope.cancel()


async def test_rpm_is_one_limit_across_two_replicas(tmp_path: Path, redis: RedisServer) -> None:
    """rpm 20, lease 10% (2 requests): a burst of 100 split between two replicas reaches the
    upstream at most 20 + 2 replicas x 1.5 leases = 26 times (docs/scaling.md)."""
    upstream = FakeUpstream(healthy)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, upstream, "127.0.0.1", 0)
        providers = {"up": {"base_url": url + "/v1", "limits": {"rpm": 20}}}
        config = write_config(tmp_path / "c.yaml", redis.url, providers, targets=["up/m"])
        async with deployment(config) as (a, b):
            statuses: list[int] = []

            async def one(replica: Replica) -> None:
                statuses.append((await replica.chat()).status_code)

            with trio.fail_after(30):
                async with trio.open_nursery() as burst:
                    for i in range(100):
                        burst.start_soon(one, (a, b)[i % 2])
        calls = len(upstream.exchanges)
        print(f"rpm 20 over two replicas: the upstream saw {calls} of 100 requests")
        assert statuses.count(200) == calls
        assert 10 <= calls <= 26
        assert set(statuses) <= {200, 429}
        nursery.cancel_scope.cancel()


async def test_a_circuit_opens_everywhere_and_one_replica_probes(
    tmp_path: Path, redis: RedisServer
) -> None:
    release = trio.Event()

    async def fails(exchange: Exchange) -> None:
        await exchange.json_answer(500, {"error": {"message": "boom"}})

    async def slow_probe(exchange: Exchange) -> None:
        await release.wait()
        await healthy(exchange)

    primary, other = FakeUpstream(fails, fails, slow_probe, healthy), FakeUpstream(healthy)
    async with trio.open_nursery() as nursery:
        urls = [await nursery.start(serve_asgi, u, "127.0.0.1", 0) for u in (primary, other)]
        circuit = {"failures": 2, "window": "1m", "open_for": "1s"}
        providers = {
            "up": {"base_url": urls[0] + "/v1", "max_retries": 0, "circuit": circuit},
            "alt": {"base_url": urls[1] + "/v1"},
        }
        config = write_config(tmp_path / "c.yaml", redis.url, providers, targets=["up/m", "alt/m"])
        async with deployment(config) as (a, b):
            for _ in range(2):
                assert (await a.chat()).status_code == 200  # up fails, alt serves
            assert len(primary.exchanges) == 2

            async def circuit_on(replica: Replica) -> str | None:
                circuits = (await replica.providers())["up"]["circuits"]
                return circuits[0]["state"] if circuits else None

            async def open_on_b() -> bool:
                return await circuit_on(b) == "open"

            async def half_open_on_both() -> bool:  # open_for has passed
                return {await circuit_on(a), await circuit_on(b)} == {"half_open"}

            await until(open_on_b)
            await until(half_open_on_both)

            # Both replicas take requests while half-open: one probe reaches `up` (it hangs
            # until released), every other request is served by `alt`.
            statuses: list[int] = []

            async def one(replica: Replica) -> None:
                statuses.append((await replica.chat()).status_code)

            def hung() -> int:  # probes still waiting on `release`
                return len(primary.exchanges) - 2

            async with trio.open_nursery() as requests:
                for round_ in range(10):  # rounds of one request to each replica at once
                    requests.start_soon(one, a)
                    requests.start_soon(one, b)

                    async def round_done(started: int = 2 * round_ + 2) -> bool:
                        return started - len(statuses) == hung()

                    await until(round_done, 10)
                assert hung() == 1, "one probe in the whole deployment"
                release.set()
            assert statuses == [200] * 20

            async def closed_on_both() -> bool:  # the probe's success closes it everywhere
                return {await circuit_on(a), await circuit_on(b)} == {None}

            await until(closed_on_both)
        nursery.cancel_scope.cancel()


async def test_redis_killed_and_restarted_never_stops_answers(
    tmp_path: Path, redis: RedisServer
) -> None:
    """SIGKILL Redis mid-run: every request is still answered, the backend-up gauge goes 0 then
    1, and a block learned during the outage reaches the other replica after it."""
    limited = False

    async def up_handler(exchange: Exchange) -> None:
        if limited:
            await exchange.json_answer(
                429, {"error": {"type": "rate_limit_error", "message": "no"}}, retry_after="30"
            )
        else:
            await healthy(exchange)

    primary, other = FakeUpstream(up_handler), FakeUpstream(healthy)
    async with trio.open_nursery() as nursery:
        urls = [await nursery.start(serve_asgi, u, "127.0.0.1", 0) for u in (primary, other)]
        providers = {"up": {"base_url": urls[0] + "/v1"}, "alt": {"base_url": urls[1] + "/v1"}}
        config = write_config(tmp_path / "c.yaml", redis.url, providers, targets=["up/m", "alt/m"])
        async with deployment(config) as (a, b):

            async def gauge(replica: Replica) -> float:
                text = (await replica.get("/metrics")).text
                found = re.search(
                    r'^cascade_state_backend_up\{backend="redis"\} (\S+)$', text, re.M
                )
                assert found is not None
                return float(found.group(1))

            assert [await gauge(a), await gauge(b)] == [1.0, 1.0]
            await redis.kill()

            async def both_down() -> bool:
                return [await gauge(a), await gauge(b)] == [0.0, 0.0]

            await until(both_down)
            ready = await a.get("/readyz")
            assert ready.status_code == 200  # an outage is in the body, not the status
            assert ready.json()["state"]["up"] is False
            assert "down_for_s" in ready.json()["state"]
            for replica in (a, b, a, b):
                assert (await replica.chat()).status_code == 200
            calls_before = len(primary.exchanges)

            limited = True  # learned by A alone while Redis is away
            assert (await a.chat()).status_code == 200  # 429 from up, alt serves
            limited = False
            assert len(primary.exchanges) == calls_before + 1
            assert (await b.providers())["up"]["blocks"] == []  # B cannot know yet

            await redis.start()

            async def both_up() -> bool:
                return [await gauge(a), await gauge(b)] == [1.0, 1.0]

            await until(both_up, 15)  # reconnect backoff is at most 5 s

            async def b_knows() -> bool:
                return bool((await b.providers())["up"]["blocks"])

            await until(b_knows)
            assert (await b.chat()).status_code == 200
            assert len(primary.exchanges) == calls_before + 1  # B skipped up: the block holds
        log = b"".join(a.log).decode()
        assert log.count("Redis at redis://127.0.0.1") >= 2  # down once, back once: not a flood
        assert len(re.findall(r"unreachable", log)) == 1
        nursery.cancel_scope.cancel()


async def test_two_workers_with_redis_steer_each_other_and_reload_together(
    tmp_path: Path, redis: RedisServer
) -> None:
    async def rate_limited(exchange: Exchange) -> None:
        await exchange.json_answer(
            429, {"error": {"type": "rate_limit_error", "message": "no"}}, retry_after="30"
        )

    primary, other = FakeUpstream(rate_limited, healthy), FakeUpstream(healthy)
    async with trio.open_nursery() as nursery:
        urls = [await nursery.start(serve_asgi, u, "127.0.0.1", 0) for u in (primary, other)]
        config = tmp_path / "w.yaml"

        def write(route: str) -> None:
            providers = {"up": {"base_url": urls[0] + "/v1"}, "alt": {"base_url": urls[1] + "/v1"}}
            write_config(config, redis.url, providers, targets=["up/m", "alt/m"])
            raw = json.loads(config.read_text())
            raw["server"]["workers"] = 2
            raw["routes"][0]["match"] = route
            config.write_text(json.dumps(raw))

        write("gpt")
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "router", "serve", "--config", str(config)],
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        log = b""
        try:
            with trio.fail_after(30):  # both workers listening and connected to Redis
                while log.count(b"cascade listening on") < 2 or log.count(b"shared state:") < 2:
                    chunk = await proc.stderr.receive_some()
                    assert chunk, log.decode()
                    log += chunk
            assert b"state.backend: local" not in log  # the per-worker warning is for local only
            [url] = set(re.findall(rb"cascade listening on (http://\S+)", log))

            async def served(model: str) -> set[int]:
                statuses = set()
                for _ in range(12):  # each on a new connection: the kernel picks the worker
                    async with httpx.AsyncClient(base_url=url.decode()) as client:
                        r = await client.post("/v1/chat/completions", json=chat(model))
                        statuses.add(r.status_code)
                return statuses

            assert await served("gpt") == {200}
            # The first request's worker learned the 429; the other one never called `up`.
            assert len(primary.exchanges) == 1

            write("second")
            async with httpx.AsyncClient(base_url=url.decode()) as client:
                r = await client.post("/admin/reload")
            assert r.status_code == 200, r.text
            assert [w["status"] for w in r.json()["workers"]] == ["reloaded", "reloaded"]
            assert await served("second") == {200}
            write("third")
            proc.send_signal(signal.SIGHUP)
            with trio.fail_after(10):
                while log.count(b"config reloaded on 2 of 2 workers") < 2:  # POST's, SIGHUP's
                    chunk = await proc.stderr.receive_some()
                    assert chunk, log.decode()
                    log += chunk
            assert await served("third") == {200}
            assert len(primary.exchanges) == 1
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.stderr.aclose()
        nursery.cancel_scope.cancel()


# A request whose worst case (input estimate + max_tokens) is WORST, and an upstream that uses
# exactly that: budgets in these tests hold a whole number of such requests.
BUDGETED = chat(max_tokens=10)
WORST = len(json.dumps(BUDGETED, separators=(",", ":"))) // 4 + 10


async def exact(exchange: Exchange) -> None:
    await exchange.json_answer(
        200,
        {"id": "x", "object": "chat.completion", "model": "m",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                      "finish_reason": "stop"}],
         "usage": {"prompt_tokens": WORST - 10, "completion_tokens": 10, "total_tokens": WORST}},
    )  # fmt: skip


@pytest.mark.parametrize("dropped", [False, True], ids=["connected", "after-client-kill"])
async def test_two_replicas_cannot_together_overspend_one_budget(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch, dropped: bool
) -> None:
    """A budget of exactly 10 requests' worst case, 40 requests split between two replicas at
    once: 10 are served, 30 refused with budget_exceeded, and Redis has charged exactly 10. Also
    after Redis dropped every replica's connection (CLIENT KILL): the reservation path binds to
    the new connection (it kept the old one, and every reservation failed, issue 21)."""
    key = "sk-shared-budget-0123456789abcdef0123"
    monkeypatch.setenv("SHARED_BUDGET_KEY", key)
    body, worst = BUDGETED, WORST

    upstream = FakeUpstream(exact)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, upstream, "127.0.0.1", 0)
        config = write_config(
            tmp_path / "c.yaml", redis.url, {"up": {"base_url": url + "/v1"}}, targets=["up/m"]
        )
        raw = json.loads(config.read_text())
        raw["auth"] = {"keys": [{"name": "shared", "key_env": "SHARED_BUDGET_KEY",
                                 "budgets": [{"tokens": 10 * worst, "period": "day"}]}]}  # fmt: skip
        config.write_text(json.dumps(raw))
        async with deployment(config) as (a, b):
            statuses: list[int] = []
            if dropped:  # every replica's connections dropped; the race once they reconnected
                await redis.command("CLIENT", "KILL", "TYPE", "normal")
                await redis.command("CLIENT", "KILL", "TYPE", "pubsub")

                async def back() -> bool:
                    return all(b"is back after" in b"".join(r.log) for r in (a, b))

                await until(back, 10)

            async def one(replica: Replica) -> None:
                headers = {"authorization": f"Bearer {key}"}
                async with httpx.AsyncClient(base_url=replica.url, headers=headers) as client:
                    r = await client.post("/v1/chat/completions", json=body)
                statuses.append(r.status_code)

            with trio.fail_after(30):
                async with trio.open_nursery() as burst:
                    for i in range(40):
                        burst.start_soon(one, (a, b)[i % 2])
            assert sorted(statuses) == [200] * 10 + [429] * 30
            assert len(upstream.exchanges) == 10

            async def settled() -> bool:  # settlements are written by each replica's task
                day = time.strftime("%Y-%m-%d", time.gmtime())
                reply = await redis.command("GET", f"t:budget:shared:spent:tokens:{day}")
                return reply.split(b"\r\n")[1:2] == [str(10 * worst).encode()]

            await until(settled)
            reserved = await redis.command("HGET", "t:budget:shared:reserved", "tokens")
            assert float(reserved.split(b"\r\n")[1]) == 0
            # Both replicas show the deployment's figures, and their own share beside them
            shown = [(await r.get("/admin/keys")).json()["keys"][0] for r in (a, b)]
            assert [s["scope"] for s in shown] == ["deployment", "deployment"]
            assert shown[0]["spent_today"] == shown[1]["spent_today"]
            assert shown[0]["spent_today"]["tokens"] == 10 * worst
            assert shown[0]["budgets"][0]["spent"] == 10 * worst
            shares = [s["this_replica"]["spent_today"]["tokens"] for s in shown]
            assert sum(shares) == 10 * worst  # each replica settled its own share
            # and the budget gauge is the deployment's on both: nothing left
            gauge = 'cascade_key_budget_remaining{key="shared",period="day",unit="tokens"} 0.0'

            async def gauges_agree() -> bool:
                texts = [(await r.get("/metrics")).text for r in (a, b)]
                return all(gauge in text for text in texts)

            await until(gauges_agree)
        nursery.cancel_scope.cancel()


async def test_two_replicas_on_one_redis_continue_one_conversation(
    tmp_path: Path, redis: RedisServer
) -> None:
    """The Responses API's stored responses live in Redis: a conversation begun on one replica
    continues on the other, the moment the first answer arrives (issue 20), and is gone from
    both once deleted."""
    providers = {"m": {"mock": {}}}
    config = write_config(tmp_path / "c.json", redis.url, providers, targets=["m/x"])
    async with deployment(config) as (a, b):
        async with httpx.AsyncClient(timeout=20) as client:
            first = await client.post(
                f"{a.url}/v1/responses", json={"model": "gpt", "input": "one", "stream": True}
            )
            done = [json.loads(x[6:]) for x in first.text.splitlines() if x.startswith("data: ")]
            first_id = done[-1]["response"]["id"]
            second = await client.post(
                f"{b.url}/v1/responses",
                json={"model": "gpt", "input": "two", "previous_response_id": first_id},
            )
            items = await client.get(f"{a.url}/v1/responses/{second.json()['id']}/input_items")
            gone = await client.delete(f"{b.url}/v1/responses/{first_id}")
            after = await client.get(f"{a.url}/v1/responses/{first_id}")
    assert second.status_code == 200, second.text
    assert [i["role"] for i in items.json()["data"]][::-1] == ["user", "assistant", "user"]
    assert gone.json()["deleted"] is True and after.status_code == 404


async def test_a_key_made_or_revoked_on_one_replica_holds_on_the_other_within_a_second(
    tmp_path: Path, redis: RedisServer
) -> None:
    """Client keys made through one replica's admin API reach the other through Redis (a table
    and a channel), and a revocation too: the revoked key is refused everywhere (issue 21)."""
    config = write_config(tmp_path / "c.json", redis.url, {"m": {"mock": {}}}, targets=["m/x"])
    raw = json.loads(config.read_text())
    raw["auth"] = {"keys": [{"name": "static", "sha256": "0" * 64}]}  # keys on from the start
    config.write_text(json.dumps(raw))
    async with deployment(config) as (a, b):
        async with httpx.AsyncClient(timeout=20) as client:
            made = await client.post(f"{a.url}/admin/keys", json={"name": "ci"})
            secret = made.json()["key"]
            auth = {"authorization": f"Bearer {secret}"}

            async def status_on_b() -> int:
                r = await client.post(f"{b.url}/v1/chat/completions", json=chat(), headers=auth)
                return r.status_code

            start = trio.current_time()
            await until(lambda: _is(status_on_b, 200), 1.0)  # made on A, valid on B
            made_after = trio.current_time() - start
            await client.post(f"{a.url}/admin/keys/ci/revoke")
            start = trio.current_time()
            await until(lambda: _is(status_on_b, 401), 1.0)  # revoked on A, refused on B
            revoked_after = trio.current_time() - start
            listed = (await client.get(f"{b.url}/admin/keys")).json()["keys"]
    assert made.status_code == 201 and [k["name"] for k in listed] == ["static"]
    assert made_after < 1.0 and revoked_after < 1.0


async def _is(check: Callable[[], Awaitable[int]], expected: int) -> bool:
    return await check() == expected


async def test_a_client_keys_rpm_is_one_limit_across_two_replicas(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rpm 20 for a key, 40 requests split between two replicas at once: 20 are served (each
    replica alone would admit 20, 40 in all, before issue 21), the rest refused rpm."""
    secret = "sk-rpm-shared-0123456789abcdef0123"
    monkeypatch.setenv("RPM_KEY", secret)
    config = write_config(tmp_path / "c.json", redis.url, {"m": {"mock": {}}}, targets=["m/x"])
    raw = json.loads(config.read_text())
    raw["auth"] = {"keys": [{"name": "team", "key_env": "RPM_KEY", "rpm": 20}]}
    config.write_text(json.dumps(raw))
    async with deployment(config) as (a, b):
        statuses: list[int] = []

        async def one(replica: Replica) -> None:
            headers = {"authorization": f"Bearer {secret}"}
            async with httpx.AsyncClient(base_url=replica.url, headers=headers) as client:
                r = await client.post("/v1/chat/completions", json=chat())
            statuses.append(r.status_code)

        with trio.fail_after(30):
            async with trio.open_nursery() as burst:
                for i in range(40):
                    burst.start_soon(one, (a, b)[i % 2])
        served = statuses.count(200)
        assert 18 <= served <= 20 and statuses.count(429) == 40 - served  # leases: <= 2 unspent
        # A key without budgets, no usage store: /admin/usage is the deployment's on both
        await until(lambda: _usage_is(a, served), 10)
        await until(lambda: _usage_is(b, served), 10)
        mine = [await _requests(r, "this_replica") for r in (a, b)]
        assert sum(mine) == served and all(mine)
        assert (await a.get("/admin/usage?scope=replica")).status_code == 404  # no usage_db


async def _requests(replica: Replica, part: str = "usage") -> int:
    body = (await replica.get("/admin/usage")).json()
    assert body["scope"] == "deployment"
    return sum(int(row["requests"]) for row in body[part])


async def _usage_is(replica: Replica, requests: int) -> bool:
    return await _requests(replica) == requests


async def test_a_redis_restart_forgets_no_spend(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis killed and started again empty (no persistence): each replica adds its books back
    once it reconnects, so a nearly spent budget still serves exactly what fits (issue 21: a
    restart forgot every budget's spend)."""
    secret = "sk-reseed-0123456789abcdef0123456789"
    monkeypatch.setenv("RESEED_KEY", secret)
    body, worst = BUDGETED, WORST

    async def post(replica: Replica) -> int:
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=replica.url, headers=headers) as client:
            return (await client.post("/v1/chat/completions", json=body)).status_code

    async def spent() -> float:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        reply = await redis.command("GET", f"t:budget:team:spent:tokens:{day}")
        return (
            float(reply.split(b"\r\n")[1]) if reply.startswith(b"$") and b"$-1" not in reply else 0
        )

    upstream = FakeUpstream(exact)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, upstream, "127.0.0.1", 0)
        configs = []
        for name in ("a", "b"):  # each replica with its own books (usage store)
            config = write_config(tmp_path / f"{name}.json", redis.url,
                                  {"up": {"base_url": url + "/v1"}}, targets=["up/m"])  # fmt: skip
            raw = json.loads(config.read_text())
            raw["auth"] = {"usage_db": str(tmp_path / f"{name}.sqlite3"),
                           "keys": [{"name": "team", "key_env": "RESEED_KEY",
                                     "budgets": [{"tokens": 10 * worst, "period": "day"}]}]}  # fmt: skip
            config.write_text(json.dumps(raw))
            configs.append(config)
        replicas = [await start_replica(nursery, c) for c in configs]
        a, b = replicas
        try:
            await connected(a, b)
            assert [await post(r) for r in (a, b, a, b, a, b)] == [200] * 6
            await until(lambda: _equal(spent, 6 * worst))
            await until(lambda: _usage_is(a, 6))
            await redis.kill()
            await redis.start()  # empty: no persistence

            async def added_back() -> bool:
                return all(b"their spend is added back" in b"".join(r.log) for r in (a, b))

            await until(added_back, 15)
            assert await spent() == 6 * worst  # both replicas' books, once each
            await until(lambda: _usage_is(b, 6))  # and the deployment's usage, once each
            assert [await _requests(r, "this_replica") for r in (a, b)] == [3, 3]
            statuses: list[int] = []

            async def one(replica: Replica) -> None:
                statuses.append(await post(replica))

            with trio.fail_after(30):
                async with trio.open_nursery() as burst:
                    for i in range(20):
                        burst.start_soon(one, (a, b)[i % 2])
            assert sorted(statuses) == [200] * 4 + [429] * 16  # what the budget had left
        finally:
            await stop(replicas)
            nursery.cancel_scope.cancel()


async def _equal(read: Callable[[], Awaitable[float]], expected: float) -> bool:
    return await read() == expected
