"""router/web/server.py: new connections waiting in the listening socket's backlog are taken in
one scheduling round, not one round each as trio's accept takes them (on a busy server, where a
round is long, a burst of clients waited for every connection before theirs). Real TCP sockets
on 127.0.0.1.
"""

from __future__ import annotations

import socket
from functools import partial
from typing import Any

import trio
import trio.testing

from router.web.asgi import lifespan
from router.web.server import _ACCEPT_BURST, serve_asgi
from tests.helpers import TaskSteps

REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


async def accept_rounds(connections: int) -> int:
    """The accept loop's scheduling rounds for `connections` queued at once; each is answered."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
        port = int(url.rsplit(":", 1)[1])
        await trio.testing.wait_all_tasks_blocked()  # the accept loop waits on the socket
        steps = TaskSteps(lambda task: task.name.endswith("_serve_one_listener"))
        trio.lowlevel.add_instrument(steps)
        try:  # connected by the kernel, into the backlog, before the server runs again
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(steps)
        for raw in clients:
            client = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
            await client.send_all(REQUEST)
            answer = b""
            while chunk := await client.receive_some(1 << 16):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
            await client.aclose()
        nursery.cancel_scope.cancel()
    return steps.steps


async def test_connections_queued_at_once_are_accepted_in_one_round() -> None:
    with trio.fail_after(10):
        one = await accept_rounds(1)
        many = await accept_rounds(8)
    assert one > 0
    assert many == one  # (trio's accept alone: a round more for each further connection)


async def test_a_burst_larger_than_a_round_takes_is_accepted_over_more_rounds() -> None:
    """At most _ACCEPT_BURST a round: a backlog of thousands does not hold the run loop."""
    with trio.fail_after(10):
        one = await accept_rounds(1)
        over = await accept_rounds(_ACCEPT_BURST + 1)
    assert over == one + 1
