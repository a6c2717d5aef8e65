"""Test doubles of the *outside* world only: scripted upstream providers and a gateway around them.

Cascade's own code (actors, dispatcher, app) always runs for real; only the upstream HTTP server
is faked, through httpx's own `MockTransport` (virtual time) or a real socket (end-to-end).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trustme

from router.config import Config
from router.face.app import App
from router.face.gateway import Gateway
from router.serving.assembly import Assembly, MockServers
from router.telemetry.metrics import Metrics

Step = Callable[[httpx.Request], Awaitable[httpx.Response]]


def completion(model: str = "m", content: str = "hello", tokens: int = 7) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": tokens - 3, "total_tokens": tokens},
    }


def chunk(content: str, model: str = "m", finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class TaskSteps(trio.abc.Instrument):
    """Counts the scheduling rounds the tasks `counts(task)` picks go through."""

    def __init__(self, counts: Callable[[trio.lowlevel.Task], bool]) -> None:
        self.counts = counts
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.counts(task):
            self.steps += 1

    @classmethod
    def of_this_task(cls) -> TaskSteps:
        this = trio.lowlevel.current_task()
        return cls(lambda task: task is this)


def ok(content: str = "hello", delay: float = 0.0) -> Step:
    async def step(request: httpx.Request) -> httpx.Response:
        await trio.sleep(delay)
        model = json.loads(request.content)["model"]
        return httpx.Response(200, json=completion(model, content))

    return step


def status(
    code: int, body: Any = None, headers: dict[str, str] | None = None, delay: float = 0.0
) -> Step:
    async def step(request: httpx.Request) -> httpx.Response:
        await trio.sleep(delay)
        payload = (
            body if body is not None else {"error": {"message": f"status {code}", "type": "x"}}
        )
        return httpx.Response(code, json=payload, headers=headers)

    return step


def stall() -> Step:
    """Accepts the request and never answers."""

    async def step(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    return step


def connect_error() -> Step:
    async def step(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    return step


def stream(
    pieces: list[bytes],
    *,
    first_delay: float = 0.0,
    interval: float = 0.0,
    cut_after: int | None = None,
    stall_after: int | None = None,
    done: bool = True,
) -> Step:
    """A streamed answer: `pieces` are raw body chunks (use `chunk()` for events)."""
    items = [*pieces, b"data: [DONE]\n\n"] if done else list(pieces)

    class Body:
        """A class-based async iterator: nothing for the garbage collector when it is abandoned."""

        def __init__(self) -> None:
            self.i = 0

        def __aiter__(self) -> Body:
            return self

        async def __anext__(self) -> bytes:
            i = self.i
            self.i += 1
            if i >= len(items):
                raise StopAsyncIteration
            await trio.sleep(first_delay if i == 0 else interval)
            if cut_after is not None and i == cut_after:
                raise httpx.ReadError("connection reset by peer")
            if stall_after is not None and i == stall_after:
                await trio.sleep_forever()
            return items[i]

    async def step(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=Body())

    return step


@attrs.define
class Call:
    time: float
    body: bytes
    headers: httpx.Headers
    model: str


class Upstream:
    """A scripted provider. Each call takes the next step; the last step repeats."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps) or [ok()]
        self.calls: list[Call] = []
        self.active = 0
        self.cancelled = 0
        self.cancel_times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        model = json.loads(body).get("model", "") if body else ""
        self.calls.append(Call(trio.current_time(), body, request.headers, model))
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        self.active += 1
        try:
            return await step(request)
        except trio.Cancelled:
            self.cancelled += 1
            self.cancel_times.append(trio.current_time())
            raise
        finally:
            self.active -= 1

    @property
    def times(self) -> list[float]:
        return [c.time for c in self.calls]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def config(
    providers: dict[str, dict[str, Any]] | list[str], routes: list[dict[str, Any]], **extra: Any
) -> Config:
    if isinstance(providers, list):
        providers = {name: {} for name in providers}
    raw = {
        "providers": {
            name: {"base_url": f"http://{name}.test/v1", **settings}
            for name, settings in providers.items()
        },
        "routes": routes,
        **extra,
    }
    return Config.from_mapping(raw)


@asynccontextmanager
async def gateway(
    cfg: Config, upstreams: dict[str, Upstream], seed: int = 0
) -> AsyncIterator[Gateway]:
    """The gateway `cascade serve` assembles (real actors of each provider's dialect, dispatcher,
    key gate), with each provider's HTTP served by its scripted Upstream, a seeded rng and a
    fixed wall clock."""
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        assembly = Assembly(
            metrics,
            nursery,
            MockServers(nursery),
            {name: upstream.transport() for name, upstream in upstreams.items()},
            rng=random.Random(seed),
            wall_clock=lambda: 1_000_000.0,
        )
        gw, _ = await assembly.build(cfg)
        yield gw
        for actor in gw.actors.values():
            actor.close()


def asgi_client(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(App(gw)), base_url="http://cascade")


def chat(model: str = "gpt", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def read_request(
    stream: trio.abc.ReceiveStream, buffer: bytes = b""
) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 request off the server side of a connection (its head and its
    content-length body) and the bytes after it; None when the peer closes before a whole one.
    `buffer`: what an earlier read left over."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        rest += data
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait (bounded) until `predicate()` holds.

    Polling is deliberate: the state watched (an actor's in-flight count, a metric) has no event,
    and adding one only for tests would put test hooks on the hot path.
    """
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


def tls_files(tmp_path: Path, *hosts: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for `hosts`: (certfile, keyfile, the CA's file)."""
    ca = trustme.CA()
    cert = ca.issue_cert(*hosts)
    certfile, keyfile, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(ca_file))
    return certfile, keyfile, ca_file


async def start_cascade(config: Path) -> tuple[trio.Process, str, list[bytes]]:
    """`cascade serve --config config` as a real process: it, the URL it listens on, and its
    stderr so far (the caller drains the rest)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "router", "serve", "--config", str(config)], stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    log: list[bytes] = []
    while not (m := re.search(rb"cascade listening on (http://\S+)", b"".join(log))):
        chunk = await proc.stderr.receive_some()
        assert chunk, b"".join(log).decode()
        log.append(chunk)
    return proc, m.group(1).decode(), log
