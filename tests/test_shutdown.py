"""Graceful shutdown of a real `cascade serve` process: SIGTERM with a stream in flight."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from router.web.server import serve_asgi
from tests.helpers import chat, eventually, sse_data, start_cascade
from tests.live import Exchange, FakeUpstream, chunk_event


def slow_stream(events: int, interval: float) -> Any:
    async def handler(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        for i in range(events):
            await exchange.body_part(chunk_event(f"w{i} "))
            await trio.sleep(interval)
        await exchange.body_part(chunk_event("", finish="stop"))
        await exchange.body_part(b"data: [DONE]\n\n", more=False)

    return handler


async def run_gateway(
    tmp_path: Path, upstream_url: str, grace: str
) -> tuple[trio.Process, str, list[bytes]]:
    config = tmp_path / "cascade.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {"port": 0, "grace": grace},
                "providers": {"up": {"base_url": upstream_url + "/v1"}},
                "routes": [{"match": "gpt", "targets": ["up/m"]}],
            }
        )
    )
    return await start_cascade(config)


async def stream_then_sigterm(tmp_path: Path, grace: str, events: int) -> tuple[str, int]:
    async with trio.open_nursery() as nursery:
        upstream = FakeUpstream(slow_stream(events, 0.1))
        upstream_url = await nursery.start(serve_asgi, upstream, "127.0.0.1", 0)
        proc, url, log = await run_gateway(tmp_path, upstream_url, grace)

        async def drain_log() -> None:
            assert proc.stderr is not None
            while chunk := await proc.stderr.receive_some():
                log.append(chunk)

        nursery.start_soon(drain_log)
        body = b""
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
                async for piece in r.aiter_raw():
                    if not body:
                        proc.send_signal(signal.SIGTERM)  # the stream is in flight
                    body += piece
        code = await proc.wait()
        nursery.cancel_scope.cancel()  # drain_log stops reading first
    assert proc.stderr is not None
    await proc.stderr.aclose()  # its pipe now, not whenever the GC gets to it
    return body.decode(), code


async def test_sigterm_lets_a_stream_in_flight_finish_and_exits_zero(tmp_path: Path) -> None:
    with trio.fail_after(30):
        body, code = await stream_then_sigterm(tmp_path, grace="10s", events=10)
    data = sse_data(body)
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[:-1]] == [
        *(f"w{i} " for i in range(10)),
        "",
    ]
    assert data[-1] == "[DONE]"
    assert code == 0


async def test_a_stream_that_outlives_the_grace_ends_with_an_in_band_error(tmp_path: Path) -> None:
    with trio.fail_after(30):
        body, code = await stream_then_sigterm(tmp_path, grace="500ms", events=100)
    data = sse_data(body)
    assert json.loads(data[-1])["error"]["code"] == "shutting_down"
    assert "[DONE]" not in data
    assert code == 0


async def test_while_draining_readyz_answers_503_and_new_requests_are_refused(
    tmp_path: Path,
) -> None:
    """After SIGTERM, with a stream still in flight, the listener stays open: a load balancer's
    new connection to /readyz gets 503 (not a refused connection), a new model request 503
    `shutting_down` with Retry-After; the stream finishes and the process exits 0."""
    async with trio.open_nursery() as nursery:
        upstream = FakeUpstream(slow_stream(30, 0.1))
        upstream_url = await nursery.start(serve_asgi, upstream, "127.0.0.1", 0)
        proc, url, log = await run_gateway(tmp_path, upstream_url, "10s")
        nursery.start_soon(_drain, proc, log)
        with trio.fail_after(30):
            async with (
                httpx.AsyncClient(base_url=url, timeout=20) as streaming,
                streaming.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r,
            ):
                body = b""
                async for piece in r.aiter_raw():
                    if not body:
                        proc.send_signal(signal.SIGTERM)
                        await eventually(lambda: b"shutting down" in b"".join(log))
                        async with httpx.AsyncClient(base_url=url) as balancer:  # new connection
                            ready = await balancer.get("/readyz")
                            late = await balancer.post("/v1/chat/completions", json=chat())
                    body += piece
            assert await proc.wait() == 0
        nursery.cancel_scope.cancel()
    assert proc.stderr is not None
    await proc.stderr.aclose()
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert late.headers["retry-after"] == "1"
    assert sse_data(body.decode())[-1] == "[DONE]"  # the stream in flight finished whole


async def _drain(proc: trio.Process, log: list[bytes]) -> None:
    assert proc.stderr is not None
    while chunk := await proc.stderr.receive_some():
        log.append(chunk)


class Workers:
    """`cascade serve` with `server.workers: 2` as a real process, its stderr drained into `log`
    as it comes (a test that stopped reading could fill the pipe and stall the processes)."""

    LISTENING = rb"cascade listening on (http://\S+) \(pid (\d+)\)"

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.log = b""
        self._grew = trio.Event()

    async def drain(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some():
            self.log += chunk
            self._grew.set()
            self._grew = trio.Event()

    async def wait_for(self, pattern: bytes, count: int = 1) -> list[Any]:
        """The matches of `pattern` in the log, once there are `count` of them."""
        while len(found := re.findall(pattern, self.log)) < count:
            assert self.proc.poll() is None, self.log.decode()
            await self._grew.wait()
        return found

    async def listening(self, count: int = 2) -> tuple[str, list[int]]:
        """The one URL every worker listens on, and the workers' pids in order of start."""
        found = await self.wait_for(self.LISTENING, count)
        [url] = {u for u, _ in found}
        return url.decode(), [int(p) for _, p in found]

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self.proc.wait()


@asynccontextmanager
async def workers(config: Path) -> AsyncIterator[Workers]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "router", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
    )
    running = Workers(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.drain)
            yield running
    finally:
        if proc.poll() is None:
            print(running.log.decode())  # shown with the failure: where it stood
            proc.kill()
            await proc.wait()
        assert proc.stderr is not None
        await proc.stderr.aclose()


async def test_two_workers_share_a_port_and_stop_together(tmp_path: Path) -> None:
    config = tmp_path / "workers.yaml"
    workers_config(config, "gpt")
    with trio.fail_after(40):
        async with workers(config) as running:
            url, pids = await running.listening()
            assert len(set(pids)) == 2  # one port, two processes
            assert await served(url, "gpt", times=10) == {200}
            assert await running.stop() == 0


def workers_config(path: Path, route: str, **mock: Any) -> None:
    path.write_text(
        json.dumps(
            {
                "server": {"port": 0, "workers": 2, "grace": "2s"},
                "providers": {"m": {"mock": {"latency": "1ms", **mock}}},
                "routes": [{"match": route, "targets": ["m/x"]}],
            }
        )
    )


async def served(url: str, model: str, times: int = 12) -> set[int]:
    """Statuses of `times` requests, each on a new connection (the kernel picks the worker)."""
    statuses = set()
    for _ in range(times):
        async with httpx.AsyncClient(base_url=url) as client:
            statuses.add((await client.post("/v1/chat/completions", json=chat(model))).status_code)
    return statuses


async def test_workers_reload_together_from_the_operators_file(tmp_path: Path) -> None:
    """POST /admin/reload to any worker reloads every worker from the file Cascade was started
    with (never the demo); a broken file changes nothing, a file that is not UTF-8 included;
    SIGHUP to the supervisor reloads all and kills nobody (issue 9.5)."""
    config = tmp_path / "workers.yaml"
    workers_config(config, "first")
    with trio.fail_after(60):
        async with workers(config) as running:
            url, _ = await running.listening()
            assert await served(url, "first") == {200}
            workers_config(config, "second")
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/admin/reload")
            assert r.status_code == 200, r.text
            result = r.json()
            assert result["status"] == "reloaded"
            assert [w["worker"] for w in result["workers"]] == [0, 1]
            assert all(w["status"] == "reloaded" for w in result["workers"])
            assert await served(url, "second") == {200}
            assert await served(url, "first") == {404}  # on every worker: none kept the old one

            config.write_text("providers: {m: {mock: {rate_429: 7}}}\nroutes: []\n")
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/admin/reload")
            assert r.status_code == 400
            assert r.json()["error"]["problems"] == [
                "providers.m.mock.rate_429: expected a number from 0 to 1, got 7"
            ]
            assert str(tmp_path) not in r.text
            assert await served(url, "second") == {200}  # nothing changed anywhere

            workers_config(config, "second")
            config.write_bytes(b"# r\xe9sum\xe9\n" + config.read_bytes())  # Latin-1
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/admin/reload")
            assert r.status_code == 400
            assert "not UTF-8" in r.json()["error"]["problems"][0]
            running.proc.send_signal(signal.SIGHUP)  # the supervisor refuses it and lives on
            await running.wait_for(rb"reload refused")

            workers_config(config, "third")
            running.proc.send_signal(signal.SIGHUP)
            # the supervisor logs once every worker has confirmed: the POST's, then this one
            await running.wait_for(rb"config reloaded on 2 of 2 workers", 2)
            assert await served(url, "third") == {200}
            assert running.proc.poll() is None  # SIGHUP killed nobody
            assert await running.stop() == 0


async def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    """kill -9 one of two workers: the other serves meanwhile; the supervisor logs the death,
    starts a new worker, counts it in /metrics and /readyz, and reloads reach the new one."""
    config = tmp_path / "workers.yaml"
    workers_config(config, "gpt")
    with trio.fail_after(60):
        async with workers(config) as running:
            url, pids = await running.listening()
            async with httpx.AsyncClient(base_url=url) as client:
                ready = (await client.get("/readyz")).json()
            assert ready["workers"] == {"wanted": 2, "running": 2, "restarts": 0}
            os.kill(pids[0], signal.SIGKILL)
            await running.wait_for(rb"worker \d \(pid %d\) died" % pids[0])
            assert await served(url, "gpt") == {200}  # the other worker serves meanwhile
            url_after, pids_after = await running.listening(3)  # the replacement is up
            assert url_after == url and pids_after[2] not in pids
            await running.wait_for(rb"worker \d replaced")
            async with httpx.AsyncClient(base_url=url) as client:
                for _ in range(4):  # new connections: whichever worker answers knows
                    ready = (await client.get("/readyz", headers={"connection": "close"})).json()
                    assert ready["workers"] == {"wanted": 2, "running": 2, "restarts": 1}
                metrics = (await client.get("/metrics")).text
            assert "cascade_worker_restarts_total 1.0" in metrics
            assert 'cascade_workers{state="running"} 2.0' in metrics
            workers_config(config, "renamed")
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/admin/reload")
            assert r.json()["status"] == "reloaded", r.text
            assert all(w["status"] == "reloaded" for w in r.json()["workers"])
            assert await served(url, "renamed") == {200}  # on both, the new worker included
            assert await running.stop() == 0


async def test_a_key_made_on_one_worker_works_on_every_worker_at_once(tmp_path: Path) -> None:
    """Without Redis, a client key made (or revoked) through one worker's admin API reaches the
    others through the supervisor, at once (issue 21: they saw it only at their next reload)."""
    config = tmp_path / "workers.yaml"
    workers_config(config, "gpt")
    raw = json.loads(config.read_text())
    raw["auth"] = {"keys": [{"name": "static", "sha256": "0" * 64}]}  # keys on from the start
    config.write_text(json.dumps(raw))

    async def statuses(secret: str, times: int = 16) -> set[int]:
        """Each request on a new connection: the kernel spreads them over both workers."""
        seen = set()
        for _ in range(times):
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/v1/chat/completions", json=chat("gpt"),
                                      headers={"authorization": f"Bearer {secret}"})  # fmt: skip
                seen.add(r.status_code)
        return seen

    with trio.fail_after(60):
        async with workers(config) as running:
            url, pids = await running.listening()
            assert len(set(pids)) == 2
            async with httpx.AsyncClient(base_url=url) as client:
                made = await client.post("/admin/keys", json={"name": "ci"})
            secret = made.json()["key"]
            with trio.fail_after(1.0):
                while await statuses(secret, 4) != {200}:  # bounded by the fail_after
                    pass
            assert await statuses(secret) == {200}  # both workers know it
            async with httpx.AsyncClient(base_url=url) as client:
                await client.post("/admin/keys/ci/revoke")
            with trio.fail_after(1.0):
                while await statuses(secret, 4) != {401}:
                    pass
            assert await statuses(secret) == {401}  # and both forgot it
            assert await running.stop() == 0
