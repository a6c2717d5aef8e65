"""A deliberately minimal upstream for benchmarks, of both dialects: asyncio protocol, canned answers
(OpenAI's chat completions; Anthropic's messages for requests to `/v1/messages`).

It must never be the bottleneck (the benchmark checks its direct throughput is at least 3x the
gateway's), so it parses only what it needs: the request line, Content-Length, and whether the
body asks for a stream. Usage:

    python benchmarks/fast_upstream.py --port 9100 [--latency 50ms] [--chunks 20] [--interval 1ms]
        [--rate-429 0.3]
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
ANTHROPIC_ANSWER = json.dumps(
    {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "bench",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 1},
    }
).encode()
ANTHROPIC_OK = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(ANTHROPIC_ANSWER), ANTHROPIC_ANSWER)
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


def anthropic_events(n: int) -> list[bytes]:
    """An Anthropic Messages stream of `n` text deltas, framed as chunks."""

    def event(name: str, data: dict[str, object]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    message = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "bench",
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
    head = event("message_start", {"type": "message_start", "message": message}) + event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    delta = event(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "tok "},
        },
    )
    tail = (
        event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": n},
            },
        )
        + event("message_stop", {"type": "message_stop"})
    )
    return [_chunk(head), *(_chunk(delta) for _ in range(n)), _chunk(tail) + b"0\r\n\r\n"]


class Upstream(asyncio.Protocol):
    def __init__(self, args: argparse.Namespace, counter: list[int]) -> None:
        self.args = args
        self.counter = counter
        self.buffer = b""
        self.events = stream_events(args.chunks)
        self.anthropic_events = anthropic_events(args.chunks)

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
            # Anthropic's shape for /v1/messages and for Bedrock's InvokeModel (/model/ID/invoke)
            anthropic = head.startswith((b"post /v1/messages ", b"post /model/"))
            self.respond(b'"stream":true' in body.replace(b" ", b""), anthropic)

    def respond(self, stream: bool, anthropic: bool = False) -> None:
        self.counter[0] += 1
        rate = self.args.rate_429
        limited = rate > 0 and (self.counter[0] * rate) % 1 < rate  # evenly spread, deterministic
        if self.args.latency:
            loop = asyncio.get_running_loop()
            loop.call_later(self.args.latency, self.send, stream, limited, anthropic)
        else:
            self.send(stream, limited, anthropic)

    def _write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def send(self, stream: bool, limited: bool, anthropic: bool = False) -> None:
        if self.transport.is_closing():
            return
        if limited:
            self.transport.write(LIMITED)
        elif stream:
            self.transport.write(STREAM_HEAD)
            events = self.anthropic_events if anthropic else self.events
            if not self.args.interval:
                for event in events:
                    self.transport.write(event)
                return
            loop = asyncio.get_running_loop()  # paced: one event every --interval
            for i, event in enumerate(events):
                loop.call_later(i * self.args.interval, self._write, event)
        else:
            self.transport.write(ANTHROPIC_OK if anthropic else OK)


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
    p.add_argument("--interval", type=_duration, default=0.0, help="between a stream's events")
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
