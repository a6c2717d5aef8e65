"""End to end over real sockets: hypercorn serving Cascade, fake upstreams on 127.0.0.1 port 0."""

from __future__ import annotations

import gc
import json
import logging
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import trio

from router.cli import main
from router.config import Config, demo_config_text
from router.serving.server import serve
from tests.helpers import chat, sse_data
from tests.live import (
    Cut,
    Exchange,
    FakeUpstream,
    answers,
    chunk_event,
    healthy,
    live_gateway,
    streams,
)


async def test_non_stream_answer() -> None:
    up = FakeUpstream(answers)
    with trio.fail_after(10):
        async with live_gateway({"a": up}) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post(
                "/v1/chat/completions", json=chat(), headers={"x-request-id": "req-42"}
            )
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "answer from m"
    assert r.headers["x-request-id"] == "req-42"
    assert up.exchanges[0].headers["x-request-id"] == "req-42"


async def test_stream_answer() -> None:
    with trio.fail_after(10):
        async with (
            live_gateway({"a": FakeUpstream(streams)}) as gw,
            httpx.AsyncClient(base_url=gw.url) as client,
        ):
            r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.headers["content-type"] == "text/event-stream"
    data = sse_data(r.text)
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[:-1]] == [
        "one ",
        "two ",
        "three",
        "",
    ]
    assert data[-1] == "[DONE]"
    assert r.headers["x-request-id"]  # generated when the client sent none


async def test_failover_before_the_first_byte() -> None:
    async def broken(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        raise Cut()

    a, b = FakeUpstream(broken), FakeUpstream(streams)
    with trio.fail_after(10):
        async with live_gateway({"a": a, "b": b}, providers={"a": {"max_retries": 0}}) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.headers["x-cascade-provider"] == "b"
    assert sse_data(r.text)[-1] == "[DONE]"
    assert len(a.exchanges) == 1


async def test_failover_on_5xx_non_stream() -> None:
    async def fails(exchange: Exchange) -> None:
        await exchange.json_answer(503, {"error": {"message": "down"}})

    a, b = FakeUpstream(fails), FakeUpstream(answers)
    with trio.fail_after(10):
        async with live_gateway(
            {"a": a, "b": b},
            providers={"a": {"max_retries": 1}},
            retry={"backoff": {"base": "10ms", "max": "10ms"}},
        ) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.headers["x-cascade-provider"] == "b"


async def test_in_band_error_after_the_first_byte() -> None:
    async def cut_mid_stream(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        await exchange.body_part(chunk_event("partial"))
        await trio.sleep(0.05)
        raise Cut()

    a, b = FakeUpstream(cut_mid_stream), FakeUpstream(streams)
    with trio.fail_after(10):
        async with (
            live_gateway({"a": a, "b": b}) as gw,
            httpx.AsyncClient(base_url=gw.url) as client,
        ):
            r = await client.post("/v1/chat/completions", json=chat(stream=True))
    data = sse_data(r.text)
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "partial"
    assert json.loads(data[-1])["error"]["code"] == "stream_cut"
    assert "[DONE]" not in data
    assert len(b.exchanges) == 0


async def test_upstream_body_is_the_clients_bytes_with_only_the_model_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CASCADE_E2E_KEY", "sk-provider")
    body = b'{"zeta":1,  "model" : "gpt",\n "messages":[{"role":"user","content":"h\xc3\xa9"}], "unknown_field": {"b":[2, 1]}}'
    up = FakeUpstream(answers)
    with trio.fail_after(10):
        async with live_gateway(
            {"a": up}, providers={"a": {"api_key_env": "CASCADE_E2E_KEY"}}
        ) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                r = await client.post(
                    "/v1/chat/completions",
                    content=body,
                    headers={
                        "content-type": "application/json",
                        "authorization": "Bearer sk-client",
                    },
                )
    assert r.status_code == 200
    seen = up.exchanges[0]
    assert seen.body == body.replace(b'"gpt"', b'"m"')
    assert seen.headers["authorization"] == "Bearer sk-provider"


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"model": "gpt"}', 400, "'messages' is required"),
        (b'{"model": ["gpt"], "messages": [{"role": "user"}]}', 400, "'model' is required"),
        (
            b'{"model": "gpt", "messages": [{"role": "user"}], "stream": 1}',
            400,
            "'stream' must be a boolean",
        ),
        (b'{"model": "unknown-model", "messages": [{"role": "user"}]}', 404, "does not exist"),
        (b'{"model": "a/x\\ud800", "messages": [{"role": "user"}]}', 400, "printable"),
        (b'{"model": "a/x\\r\\nx: 1", "messages": [{"role": "user"}]}', 400, "printable"),
        (
            b'{"model": "gpt", "messages": [{"role": "user", "content": "' + b"x" * 3000 + b'"}]}',
            413,
            "larger than",
        ),
    ],
)
async def test_bad_input_never_reaches_a_provider(
    content: bytes, status: int, fragment: str
) -> None:
    up = FakeUpstream(answers)
    with trio.fail_after(10):
        async with (
            live_gateway({"a": up}, server={"max_body": "2KiB"}) as gw,
            httpx.AsyncClient(base_url=gw.url) as client,
        ):
            r = await client.post(
                "/v1/chat/completions",
                content=content,
                headers={"content-type": "application/json"},
            )
            error = r.json()["error"]
            assert r.status_code == status and fragment in error["message"]
            assert set(error) >= {"message", "type", "code"}
            again = await client.post("/v1/chat/completions", json=chat())  # still serving
            metrics = await client.get("/metrics")
    assert again.status_code == 200
    assert metrics.status_code == 200
    assert len(up.exchanges) == 1


async def test_json_nested_100000_deep_is_a_clean_400() -> None:
    up = FakeUpstream(answers)
    deep = b'{"model": "gpt", "messages": [{"role": "user"}], "x": ' + b"[" * 100_000
    with trio.fail_after(10):
        async with live_gateway({"a": up}) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for body in (deep + b"]" * 100_000 + b"}", deep):
                r = await client.post("/v1/chat/completions", content=body)
                assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert up.exchanges == []


async def test_operational_endpoints() -> None:
    with trio.fail_after(10):
        async with (
            live_gateway({"a": FakeUpstream(answers)}) as gw,
            httpx.AsyncClient(base_url=gw.url) as client,
        ):
            await client.post("/v1/chat/completions", json=chat())
            health, ready = await client.get("/healthz"), await client.get("/readyz")
            models = await client.get("/v1/models")
            metrics = await client.get("/metrics")
            providers = await client.get("/admin/providers")
            missing = await client.get("/nope")
            wrong_method = await client.get("/v1/chat/completions")
            head = await client.head("/healthz")
            one_model = await client.get("/v1/models/gpt")
            direct_model = await client.get("/v1/models/a/anything")
            no_model = await client.get("/v1/models/nope")
    assert (health.status_code, ready.status_code) == (200, 200)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(health.content))
    assert one_model.json() == {"id": "gpt", "object": "model", "created": 0, "owned_by": "cascade"}
    assert direct_model.json()["id"] == "a/anything"
    assert no_model.status_code == 404 and no_model.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in models.json()["data"]] == ["gpt"]
    assert 'cascade_requests_total{dialect="openai",route="gpt",status="200"} 1.0' in metrics.text
    assert 'cascade_upstream_attempts_total{outcome="ok",provider="a"} 1.0' in metrics.text
    assert providers.json()["providers"][0]["name"] == "a"
    assert providers.json()["providers"][0]["in_flight"] == 0
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405


async def test_demo_config_serves_offline(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg = Config.from_yaml(demo_config_text())
    cfg = Config.from_mapping(
        {
            "server": {"port": 0},
            "providers": {n: {"mock": {"latency": "1ms"}} for n in cfg.providers},
            "routes": [
                {
                    "match": "*",
                    "targets": ["demo-flaky/gpt-4o-mini"],
                    "alternatives": ["demo-fast/gpt-4o-mini"],
                }
            ],
        }
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, cfg)
            async with httpx.AsyncClient(base_url=running.url) as client:
                r = await client.post("/v1/chat/completions", json=chat("anything", stream=True))
            nursery.cancel_scope.cancel()
    assert "[demo-flaky]" in r.text and sse_data(r.text)[-1] == "[DONE]"
    # One address is the gateway, and the log says which and what to try (issue 10.6).
    text = caplog.text
    assert "Running on" not in text  # hypercorn's banner for every server, mocks included
    assert text.count(" listening on http") == 1
    assert text.count("(an upstream, not the gateway)") == len(cfg.mocks)
    assert f"the gateway is {running.url}" in text and f"curl -s {running.url}/v1/chat" in text


def test_a_port_in_use_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "router", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("cascade:")]
    assert line == (
        f"cascade: cannot listen on 127.0.0.1:{port}: the port is already in use."
        " Choose another port with --port N (or server.port in the config)."
    )
    assert "an upstream, not the gateway" not in done.stderr  # said before any mock started


def test_check_command(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    import pathlib

    good = pathlib.Path(str(tmp_path)) / "good.yaml"
    good.write_text(demo_config_text())
    assert main(["check", str(good)]) == 0
    assert capsys.readouterr().out == "ok\n"
    bad = pathlib.Path(str(tmp_path)) / "bad.yaml"
    bad.write_text(
        "providers:\n  p: {base_url: 'http://x', timeouts: {first_byte: fast}}\nroutes: []\n"
    )
    assert main(["check", str(bad)]) == 1
    assert (
        capsys.readouterr().out
        == "providers.p.timeouts.first_byte: expected a positive duration like \"30s\", got 'fast'\n"
    )


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
async def test_request_task_ends_with_its_answer_on_a_kept_alive_connection(http2: bool) -> None:
    """The disconnect watcher returns on the server's post-answer http.disconnect: the request's
    task ends (and is counted) while the client keeps its connection open, over HTTP/1.1 and
    HTTP/2 alike."""
    counted = 'cascade_requests_total{dialect="openai",route="gpt",status="200"} 2.0'
    with trio.fail_after(10):
        async with (
            live_gateway({"a": FakeUpstream(answers, streams)}) as gw,
            httpx.AsyncClient(base_url=gw.url, http1=not http2, http2=http2) as client,
        ):
            plain = await client.post("/v1/chat/completions", json=chat())
            streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
            for _ in range(100):  # bounded: ~1 s
                metrics = await client.get("/metrics")
                if counted in metrics.text:
                    break
                await trio.sleep(0.01)
    assert plain.http_version == streamed.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert sse_data(streamed.text)[-1] == "[DONE]"
    assert counted in metrics.text


def _cascade_object(obj: object) -> str | None:
    """What `obj` is, if Cascade made it: an instance of its classes, or a frame, coroutine
    or async generator of its code."""
    kind = type(obj)
    if kind.__module__.split(".")[0] in ("router", "actors"):
        return kind.__qualname__
    code = next(
        (getattr(obj, a) for a in ("f_code", "cr_code", "ag_code") if hasattr(obj, a)), None
    )
    if code is not None and any(f"/{top}/" in code.co_filename for top in ("router", "actors")):
        return str(code.co_name)
    return None


async def test_requests_leave_no_reference_cycles_behind() -> None:
    """Every face, streamed or not, same-dialect or translated: what a request made is freed by
    reference counting when it is done. Nothing of Cascade's is left in a reference cycle for
    the cyclic GC to find (a pause that grows with the traffic, and memory held until then).
    The test's httpx client leaves its own; only Cascade's objects are counted."""
    routes = [{"match": "gpt", "targets": ["o/m"]}, {"match": "claude", "targets": ["a/m"]}]
    asks = [
        (path, {"model": model, "stream": stream, **body})
        for model in ("gpt", "claude")
        for stream in (False, True)
        for path, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/responses", {"input": "hi"}),
        )
    ]
    upstreams = {"o": FakeUpstream(healthy), "a": FakeUpstream(healthy)}
    with trio.fail_after(20):
        async with (
            live_gateway(upstreams, routes, providers={"a": {"dialect": "anthropic"}}) as gw,
            httpx.AsyncClient(base_url=gw.url) as client,
        ):

            async def ask_each() -> None:
                for path, body in asks:
                    r = await client.post(path, json=body)
                    assert r.status_code == 200, (path, body, r.text)

            await ask_each()  # the first round fills what lives on (pools, caches)
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds goes to gc.garbage
            try:
                for _ in range(2):
                    await ask_each()
                gc.collect()
                left = Counter(filter(None, map(_cascade_object, gc.garbage)))
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    assert left == Counter()
