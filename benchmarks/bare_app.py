"""The stack's ceiling: hypercorn's trio worker answering a canned completion, no upstream call.

python benchmarks/bare_app.py --port 9200 [--latency 0.05]

With --latency it sleeps that long before answering: the same wait as a slow upstream, with none
of the work of calling one, so its latency over the upstream's own is the server stack's floor.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

BODY = b'{"id":"chatcmpl-bare","object":"chat.completion","created":0,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any, latency: float = 0.0) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].rsplit(".", 1)[-1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    if latency:
        await trio.sleep(latency)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9200)
    p.add_argument("--latency", type=float, default=0.0, help="seconds to wait before answering")
    args = p.parse_args()
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.backlog = 4096
    trio.run(partial(hypercorn.trio.serve, partial(app, latency=args.latency), config))


if __name__ == "__main__":
    main()
