"""A mock OpenAI-compatible upstream with fault injection: `cascade mock`, demo and test providers.

Faults are drawn per request from one seeded rng, in this order: 429 (with or without
Retry-After), 500, stall (accepts the request, never answers) and cut (the body stops mid-way
and the connection drops). Everything else is a normal answer after `latency`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import MutableMapping
from typing import Any

import trio

from router.config import MockSettings
from router.face.asgi import lifespan, read_body

Scope = MutableMapping[str, Any]
_MAX_BODY = 64 * 1024 * 1024


class _Cut(Exception):
    """Raised mid-response: the server drops the connection without finishing the body."""


class MockUpstream:
    def __init__(self, settings: MockSettings, name: str = "mock") -> None:
        self.settings = settings
        self.name = name
        self.rng = random.Random(settings.seed)
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(scope, receive, _MAX_BODY)
        if scope["method"] == "GET" and scope["path"].endswith("/models"):
            await _json(send, 200, {"object": "list", "data": [{"id": "mock", "object": "model"}]})
            return
        if not scope["path"].endswith("/chat/completions"):
            await _json(send, 404, {"error": {"message": "not found", "type": "not_found"}})
            return
        try:
            request = json.loads(body)
            model = str(request.get("model", "mock"))
            stream = bool(request.get("stream"))
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        except (ValueError, AttributeError):
            await _json(
                send, 400, {"error": {"message": "bad json", "type": "invalid_request_error"}}
            )
            return
        self.requests += 1
        await self._answer(send, model, stream, include_usage)

    async def _answer(self, send: Any, model: str, stream: bool, include_usage: bool) -> None:
        s = self.settings
        roll = self.rng.random()
        if s.latency:
            await trio.sleep(s.latency)
        if roll < s.rate_429:
            headers = {} if s.retry_after is None else {"retry-after": f"{s.retry_after:g}"}
            error = {
                "message": "mock rate limit",
                "type": "rate_limit_error",
                "code": "rate_limit_exceeded",
            }
            await _json(send, 429, {"error": error}, headers)
            return
        roll -= s.rate_429
        if roll < s.error_rate:
            await _json(send, 500, {"error": {"message": "mock failure", "type": "server_error"}})
            return
        roll -= s.error_rate
        if roll < s.stall_rate:
            await trio.sleep_forever()
        roll -= s.stall_rate
        cut = roll < s.cut_rate
        created = int(time.time())
        ident = f"chatcmpl-mock{self.requests}"
        words = [f"word{i} " for i in range(s.chunks)]
        usage = {"prompt_tokens": 10, "completion_tokens": s.chunks, "total_tokens": 10 + s.chunks}
        if not stream:
            answer = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": f"[{self.name}] " + "".join(words),
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            if cut:
                await send(_start(200, {"content-type": "application/json"}))
                await send({"type": "http.response.body", "body": b'{"id": "', "more_body": True})
                raise _Cut()
            await _json(send, 200, answer)
            return
        await send(_start(200, {"content-type": "text/event-stream", "cache-control": "no-cache"}))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            event = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        await _more(send, chunk({"role": "assistant", "content": f"[{self.name}] "}))
        for i, word in enumerate(words):
            if s.chunk_interval:
                await trio.sleep(s.chunk_interval)
            if cut and i == len(words) // 2:
                raise _Cut()
            await _more(send, chunk({"content": word}))
        tail = chunk({}, "stop")
        if include_usage:
            event = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            tail += b"data: " + json.dumps(event).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})


def _start(status: int, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }


async def _more(send: Any, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _json(send: Any, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(obj).encode()
    await send(_start(status, {"content-type": "application/json", **(headers or {})}))
    await send({"type": "http.response.body", "body": body})
