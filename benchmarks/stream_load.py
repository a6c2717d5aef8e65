"""A streaming load generator that times events: `concurrency` clients, each on one keep-alive
connection, post streamed requests back to back for `duration` seconds and time every chunk of
server-sent events as it arrives.

    python benchmarks/stream_load.py --port 8080 [--path /v1/messages] [-c 64] [-d 10]

It prints one JSON object: streams and events per second, the p50/p99 gap between consecutive
events of a stream (events that arrive in the same read have a gap of 0), the p50/p99 time from
a request's write to its first event, and errors. Raw asyncio
sockets and a minimal chunked-body parser, so the generator stays cheap beside the server under
test. Loopback only; bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

OPENAI = b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"hello"}]}'
RESPONSES = b'{"model":"bench","stream":true,"input":"hello","store":false}'
ANTHROPIC = (
    b'{"model":"bench","max_tokens":100,"stream":true,'
    b'"messages":[{"role":"user","content":"hello"}]}'
)


class Stats:
    def __init__(self) -> None:
        self.streams = 0
        self.events = 0
        self.errors = 0
        self.gaps: list[float] = []
        self.firsts: list[float] = []  # from a request's write to its first event's arrival


async def _read_chunked(reader: asyncio.StreamReader, stats: Stats, sent: float) -> bool:
    """Read one chunked body, timing its events; True when it ended cleanly."""
    last = None
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return True
        data = await reader.readexactly(size + 2)
        now = time.perf_counter()
        events = data.count(b"\n\n")
        if events:
            if last is not None:
                stats.gaps.append(now - last)
                stats.gaps.extend([0.0] * (events - 1))
            else:
                stats.firsts.append(now - sent)
                stats.gaps.extend([0.0] * (events - 1))
            stats.events += events
            last = now


async def _client(port: int, request: bytes, until: float, stats: Stats) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            sent = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            chunked = False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                    chunked = True
            if b" 200 " not in status or not chunked:
                stats.errors += 1
                return
            if await _read_chunked(reader, stats, sent):
                stats.streams += 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        stats.errors += 1
    finally:
        writer.close()


async def run(port: int, path: str, concurrency: int, duration: float) -> dict[str, float]:
    body = (
        ANTHROPIC
        if path.endswith("/messages")
        else RESPONSES
        if path.endswith("/responses")
        else OPENAI
    )
    request = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    stats = Stats()
    started = time.perf_counter()
    until = started + duration
    await asyncio.gather(*(_client(port, request, until, stats) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    gaps = sorted(stats.gaps) or [float("nan")]
    firsts = sorted(stats.firsts) or [float("nan")]
    return {
        "streams_per_s": round(stats.streams / seconds, 1),
        "events_per_s": round(stats.events / seconds, 1),
        "events": stats.events,
        "gap_p50_ms": round(gaps[len(gaps) // 2] * 1000, 3),
        "gap_p99_ms": round(gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1000, 3),
        "first_p50_ms": round(firsts[len(firsts) // 2] * 1000, 3),
        "first_p99_ms": round(firsts[min(len(firsts) - 1, int(len(firsts) * 0.99))] * 1000, 3),
        "errors": stats.errors,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args.port, args.path, args.concurrency, args.duration))))


if __name__ == "__main__":
    main()
