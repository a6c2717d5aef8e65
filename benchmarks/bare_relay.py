"""The streaming ceiling: hypercorn's trio worker relaying an upstream's answer through the same
upstream pool Cascade uses (actors/transport.py over actors/http1.py), with no cascade, no actor,
no parsing: every chunk the upstream sends is written to the client as it comes.

python benchmarks/bare_relay.py --port 9300 --upstream http://127.0.0.1:9100

What Cascade relays on top of this (the actor hop, the dispatcher, SSE decoding and checking,
translation) is what its streaming numbers are read against.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.transport import Transport
from router.web.asgi import lifespan

HEADERS = [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]


async def app(transport: Transport, scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    async with transport.post(scope["path"], body, HEADERS, lambda phase: None) as response:
        content_type = response.headers.get("content-type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(b"content-type", content_type)],
            }
        )
        while chunk := await response.read_chunk():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9300)
    p.add_argument(
        "--upstream", required=True, help="the upstream's root, e.g. http://127.0.0.1:9100"
    )
    args = p.parse_args()
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.backlog = 4096
    transport = Transport(args.upstream, connect_timeout=10.0, max_connections=512)
    trio.run(partial(hypercorn.trio.serve, partial(app, transport), config))


if __name__ == "__main__":
    main()
