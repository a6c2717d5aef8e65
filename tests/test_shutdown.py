"""Graceful shutdown of a real `cascade serve` process: SIGTERM with a stream in flight."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from router.face.serving import serve_asgi
from tests.helpers import chat, sse_data, start_cascade
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


async def test_two_workers_share_a_port_and_stop_together(tmp_path: Path) -> None:
    config = tmp_path / "workers.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {"port": 0, "workers": 2, "grace": "2s"},
                "providers": {"m": {"mock": {"latency": "1ms"}}},
                "routes": [{"match": "gpt", "targets": ["m/x"]}],
            }
        )
    )
    with trio.fail_after(40):
        proc, url, pids = await start_workers(config)
        assert len(pids) == 2  # one port, two processes
        for _ in range(10):
            async with httpx.AsyncClient(base_url=url) as client:  # a new connection each time
                r = await client.post("/v1/chat/completions", json=chat())
                assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
        await proc.stderr.aclose()


async def start_workers(config: Path) -> tuple[trio.Process, str, set[bytes]]:
    """`cascade serve` with two workers: the process, the one URL both listen on, their pids."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "router", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    log = b""
    pattern = rb"cascade listening on (http://\S+) \(pid (\d+)\)"
    while len(re.findall(pattern, log)) < 2:
        chunk = await proc.stderr.receive_some()
        assert chunk, log.decode()
        log += chunk
    listening = re.findall(pattern, log)
    [url] = {u for u, _ in listening}
    return proc, url.decode(), {p for _, p in listening}


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
    with (never the demo); a broken file changes nothing; SIGHUP to the supervisor reloads all
    and kills nobody (issue 9.5)."""
    config = tmp_path / "workers.yaml"
    workers_config(config, "first")
    with trio.fail_after(60):
        proc, url, _ = await start_workers(config)
        try:
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

            workers_config(config, "third")
            proc.send_signal(signal.SIGHUP)
            assert proc.stderr is not None
            log = b""
            with trio.fail_after(10):  # the supervisor logs once every worker has confirmed:
                while log.count(b"config reloaded on 2 of 2 workers") < 2:  # POST's, then this
                    chunk = await proc.stderr.receive_some()
                    assert chunk, log.decode()
                    log += chunk
            assert await served(url, "third") == {200}
            assert proc.returncode is None  # SIGHUP killed nobody
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            await proc.stderr.aclose()
