"""The stack's ceiling: hypercorn's trio worker answering a canned completion, no upstream call.

python benchmarks/bare_app.py --port 9200
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


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].rsplit(".", 1)[-1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9200)
    args = p.parse_args()
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.backlog = 4096
    trio.run(partial(hypercorn.trio.serve, app, config))


if __name__ == "__main__":
    main()
