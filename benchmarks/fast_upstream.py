"""A deliberately minimal OpenAI-compatible upstream for benchmarks: asyncio protocol, canned answers.

It must never be the bottleneck (the benchmark checks its direct throughput is at least 3x the
gateway's), so it parses only what it needs: the request line, Content-Length, and whether the
body asks for a stream. Usage:

    python benchmarks/fast_upstream.py --port 9100 [--latency 50ms] [--chunks 20] [--rate-429 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(ANSWER),
    ANSWER,
)
LIMITED_BODY = b'{"error":{"message":"rate limited","type":"rate_limit_error"}}'
LIMITED = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
    % (
        len(LIMITED_BODY),
        LIMITED_BODY,
    )
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def stream_events(n: int) -> list[bytes]:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}],
    }
    one = b"data: " + json.dumps(event).encode() + b"\n\n"
    event["choices"] = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    last = b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"
    return [_chunk(one) for _ in range(n)] + [_chunk(last) + b"0\r\n\r\n"]


class Upstream(asyncio.Protocol):
    def __init__(self, args: argparse.Namespace, counter: list[int]) -> None:
        self.args = args
        self.counter = counter
        self.buffer = b""
        self.events = stream_events(args.chunks)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = (
                int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
                if at >= 0
                else 0
            )
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.respond(b'"stream":true' in body.replace(b" ", b""))

    def respond(self, stream: bool) -> None:
        self.counter[0] += 1
        rate = self.args.rate_429
        limited = rate > 0 and (self.counter[0] * rate) % 1 < rate  # evenly spread, deterministic
        if self.args.latency:
            asyncio.get_running_loop().call_later(self.args.latency, self.send, stream, limited)
        else:
            self.send(stream, limited)

    def send(self, stream: bool, limited: bool) -> None:
        if self.transport.is_closing():
            return
        if limited:
            self.transport.write(LIMITED)
        elif stream:
            self.transport.write(STREAM_HEAD)
            for event in self.events:
                self.transport.write(event)
        else:
            self.transport.write(OK)


def _duration(text: str) -> float:
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    return float(text.rstrip("s"))


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--latency", type=_duration, default=0.0)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--rate-429", type=float, default=0.0)
    args = p.parse_args()
    counter = [0]
    server = await asyncio.get_running_loop().create_server(
        lambda: Upstream(args, counter), args.host, args.port, backlog=4096, reuse_address=True
    )
    print(f"fast upstream on http://{args.host}:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
