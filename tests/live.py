"""Real-socket fixtures: fake upstream servers and the whole gateway, on 127.0.0.1 port 0.

The real clock runs here (trio's autojump clock must not be mixed with real sockets); every wait
in these tests is bounded by `fail_after`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio

from router.config import Config
from router.serving.server import Running, serve
from router.web.asgi import lifespan, read_body
from router.web.server import serve_asgi
from tests.helpers import chat, completion, sse_data

Handler = Callable[["Exchange"], Awaitable[None]]

# The official SDKs leave their stream generators to the GC when a test stops reading early (and
# openai/anthropic 2.x's httpx2 its connection's body generator too); trio reports each one.
# Cascade's own code leaves none: tests without SDK clients run with every warning an error.
SDK_LEFTOVERS = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object "
    r"(SSEDecoder|AsyncStream|PoolByteStream|HTTP11ConnectionByteStream|Response|Stream)\."
    ":pytest.PytestUnraisableExceptionWarning"
)


class Cut(Exception):
    """Raised by a handler mid-response: hypercorn drops the connection, the body unfinished."""


@attrs.define
class Exchange:
    """One request to a fake upstream, and the means to answer it."""

    body: bytes
    headers: dict[str, str]
    send: Callable[[dict[str, Any]], Awaitable[None]]
    receive: Callable[[], Awaitable[dict[str, Any]]]
    started: float
    closed: trio.Event = attrs.field(factory=trio.Event)
    path: str = ""
    query: str = ""

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    async def start(
        self, status: int = 200, content_type: str = "application/json", **headers: str
    ) -> None:
        pairs = [(b"content-type", content_type.encode())]
        pairs += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
        await self.send({"type": "http.response.start", "status": status, "headers": pairs})
        # The head leaves now, as a real upstream's would (Cascade's server, as ASGI allows,
        # holds it until a body part: this empty one).
        await self.body_part(b"")

    async def body_part(self, data: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def json_answer(self, status: int, obj: Any, **headers: str) -> None:
        await self.start(status, **headers)
        await self.body_part(json.dumps(obj).encode(), more=False)

    async def wait_disconnect(self) -> None:
        """Returns when the gateway closes this upstream connection (and sets `closed`)."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.closed.set()


class FakeUpstream:
    """An ASGI upstream that hands each request to the next handler (the last one repeats)."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.exchanges: list[Exchange] = []
        self.url = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(scope, receive, 1 << 30)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        exchange = Exchange(
            body,
            headers,
            send,
            receive,
            trio.current_time(),
            path=scope["path"],
            query=scope.get("query_string", b"").decode(),
        )
        self.exchanges.append(exchange)
        handler = self.handlers.pop(0) if len(self.handlers) > 1 else self.handlers[0]
        await handler(exchange)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk_event(content: str, finish: str | None = None) -> bytes:
    return sse(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
        }
    )


def answer(content: str = "hello", model: str = "m") -> dict[str, Any]:
    return completion(model, content)


async def answers(exchange: Exchange) -> None:
    await exchange.json_answer(
        200, answer(f"answer from {exchange.json['model']}", exchange.json["model"])
    )


def message(text: str, model: str) -> dict[str, Any]:
    """An Anthropic Messages answer."""
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 4},
    }  # fmt: skip


def anthropic_events(words: list[str], model: str) -> list[bytes]:
    """An Anthropic Messages stream, every event of it."""

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\n".encode() + sse(data)

    start = {**message("", model), "content": [], "stop_reason": None}
    out = [event("message_start", {"type": "message_start", "message": start})]
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    out += [event("content_block_start", block), event("ping", {"type": "ping"})]
    for word in words:
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": word},
        }
        out.append(event("content_block_delta", delta))
    out.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 4},
    }
    out += [event("message_delta", end), event("message_stop", {"type": "message_stop"})]
    return out


async def healthy(exchange: Exchange) -> None:
    """A healthy provider of whichever dialect was asked (by the path), streamed or not."""
    model = exchange.json["model"]
    if not exchange.path.endswith("/messages"):
        await (streams if exchange.json.get("stream") else answers)(exchange)
    elif not exchange.json.get("stream"):
        await exchange.json_answer(200, message(f"answer from {model}", model))
    else:
        await exchange.start(200, "text/event-stream")
        for part in anthropic_events(["one ", "two ", "three"], model):
            await exchange.body_part(part)
        await exchange.body_part(b"", more=False)


async def streams(exchange: Exchange) -> None:
    await exchange.start(200, "text/event-stream")
    for word in ("one ", "two ", "three"):
        await exchange.body_part(chunk_event(word))
    await exchange.body_part(chunk_event("", "stop") + b"data: [DONE]\n\n", more=False)


@asynccontextmanager
async def live_gateway(
    upstreams: dict[str, FakeUpstream],
    routes: list[dict[str, Any]] | None = None,
    providers: dict[str, dict[str, Any]] | None = None,
    extra_providers: dict[str, dict[str, Any]] | None = None,
    **extra: Any,
) -> AsyncIterator[Running]:
    """The whole gateway (hypercorn + actors) in front of fake upstreams, all on loopback."""
    async with trio.open_nursery() as nursery:
        for upstream in upstreams.values():
            upstream.url = await nursery.start(partial(serve_asgi, upstream, "127.0.0.1", 0))
        raw_providers = {
            name: {"base_url": upstream.url + "/v1", **(providers or {}).get(name, {})}
            for name, upstream in upstreams.items()
        }
        raw_providers.update(extra_providers or {})
        server = {"port": 0, "grace": "1s", **extra.pop("server", {})}
        routes = routes or [{"match": "gpt", "targets": [f"{name}/m" for name in upstreams]}]
        cfg = Config.from_mapping(
            {"server": server, "providers": raw_providers, "routes": routes, **extra}
        )
        running = await nursery.start(partial(serve, cfg))
        yield running
        nursery.cancel_scope.cancel()


@attrs.frozen
class Face:
    """A dialect as the table's tests use it: both the client's and the providers'."""

    name: str
    endpoint: str

    def body(self, stream: bool) -> dict[str, Any]:
        if self.name == "openai":
            return chat(stream=stream)
        return {
            "model": "gpt",
            "max_tokens": 50,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }

    def served_ok(self, r: httpx.Response, stream: bool) -> bool:
        if r.status_code != 200:
            return False
        if self.name == "openai":
            return sse_data(r.text)[-1] == "[DONE]" if stream else bool(r.json()["choices"])
        return '"message_stop"' in sse_data(r.text)[-1] if stream else bool(r.json()["content"])


OPENAI = Face("openai", "/v1/chat/completions")
ANTHROPIC = Face("anthropic", "/v1/messages")
# The rows that mean the same in both dialects run for each: clients and providers of one dialect.
faces = pytest.mark.parametrize("face", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
