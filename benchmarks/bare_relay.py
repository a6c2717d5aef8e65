"""The streaming ceiling: hypercorn's trio worker relaying an upstream's answer through the same
upstream pool Cascade uses (actors/transport.py over actors/http1.py), with no cascade, no actor,
no parsing: every chunk the upstream sends is written to the client as it comes.

python benchmarks/bare_relay.py --port 9300 --upstream http://127.0.0.1:9100 [--hop]

What Cascade relays on top of this (the actor hop, the dispatcher, SSE decoding and checking,
translation) is what its streaming numbers are read against.

`--hop` adds only the hop that DESIGN §2 puts between a request and its upstream call, as
Cascade makes it: one long-lived task (the actor) takes each call from its inbox (with the calls
queued behind it, in one scheduling round) and runs it as a child task inside a cancel scope the
request made, and the call's chunks come back to the request's task over a reply channel (16
deep, as Cascade's), which takes what is queued in one write. The actor hands chunks on without
a scheduling round when the channel has room, and after the start and after a read of several
events it reads again only once the request's task has asked for more (a `Demand`), as Cascade's
actor does. No admission, no state, no parsing: what the hop alone costs, measured against the
ceiling.
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

from actors.messages import Demand
from actors.transport import Transport, TransportError
from router.web.asgi import lifespan

HEADERS = [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]
# As router/cascade/dispatcher.py's (a test holds them equal). Not imported: the relay loads
# no more of Cascade than its pool, so that its heap is not what is measured.
REPLY_BUFFER = 16


async def request_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def app(transport: Transport, scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = await request_body(receive)
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


# --- with the actor contract's hop (--hop) ------------------------------------------------------

Call = tuple[str, bytes, trio.MemorySendChannel[Any], trio.CancelScope, Demand]
END = b""  # the reply that ends a call's chunks


async def upstream_call(
    transport: Transport,
    path: str,
    body: bytes,
    replies: trio.MemorySendChannel[Any],
    scope: trio.CancelScope,
    demand: Demand,
) -> None:
    """One call, as the actor runs it: inside the request's scope, chunks to its channel, read
    as Cascade's actor reads them (actors/provider.py, `_Call.pump`): after the start and after
    a read that held several events, only once the request's task has asked for more. A call
    that fails closes the channel (the request's task fails, not the actor)."""
    with scope, replies:
        try:
            async with transport.post(path, body, HEADERS, lambda phase: None) as response:
                content_type = response.headers.get("content-type", "application/json").encode()
                demand.sent()
                await replies.send((response.status, content_type))
                wait = True
                while True:
                    if wait and not demand.asked:
                        await demand.wait()
                    chunk = await response.read_chunk()
                    if not chunk:
                        break
                    wait = chunk.count(b"\n\n") > 1 and not response.at_end()
                    demand.sent()
                    try:
                        replies.send_nowait(chunk)
                    except trio.WouldBlock:
                        await replies.send(chunk)
                await replies.send(END)
        except TransportError:
            return


async def actor(transport: Transport, inbox: trio.MemoryReceiveChannel[Call]) -> None:
    async with trio.open_nursery() as nursery:
        async for call in inbox:
            nursery.start_soon(upstream_call, transport, *call)
            while True:  # what queued meanwhile, in the same scheduling round (as Cascade's)
                try:
                    queued = inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                nursery.start_soon(upstream_call, transport, *queued)


async def hop_app(
    inbox: trio.MemorySendChannel[Call], scope: dict[str, Any], receive: Any, send: Any
) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = await request_body(receive)
    replies, received = trio.open_memory_channel[Any](REPLY_BUFFER)
    cancel, demand = trio.CancelScope(), Demand()
    inbox.send_nowait((scope["path"], body, replies, cancel, demand))
    try:
        status, content_type = await received.receive()
        headers = [(b"content-type", content_type)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        while True:
            demand.want()  # what it took is written: the actor may read again
            batch = [await received.receive()]
            while batch[-1] is not END:  # what is queued goes in the same write
                try:
                    batch.append(received.receive_nowait())
                except trio.WouldBlock:
                    break
            await send({"type": "http.response.body", "body": b"".join(batch), "more_body": True})
            if batch[-1] is END:
                break
        await send({"type": "http.response.body", "body": b""})
    finally:
        cancel.cancel()


async def serve_with_hop(transport: Transport, config: hypercorn.config.Config) -> None:
    calls, inbox = trio.open_memory_channel[Call](4096)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor, transport, inbox)
        await hypercorn.trio.serve(partial(hop_app, calls), config)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9300)
    p.add_argument(
        "--upstream", required=True, help="the upstream's root, e.g. http://127.0.0.1:9100"
    )
    p.add_argument("--hop", action="store_true", help="with the actor contract's hop")
    args = p.parse_args()
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.backlog = 4096
    transport = Transport(args.upstream, connect_timeout=10.0, max_connections=512)
    if args.hop:
        trio.run(serve_with_hop, transport, config)
    else:
        trio.run(partial(hypercorn.trio.serve, partial(app, transport), config))


if __name__ == "__main__":
    main()
