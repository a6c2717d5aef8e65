"""The HTTP server under every ASGI app Cascade runs (the gateway, the mock upstreams): hypercorn's
trio worker, through its public `hypercorn.trio.serve`, with one fix to its connection handling.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import hypercorn.config
import hypercorn.trio
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import trio

_WRITE_MARGIN = 1.0  # seconds after the grace period to write streams' closing errors


def hypercorn_config(
    host: str, port: int, grace: float, keep_alive: float = 75.0
) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.graceful_timeout = grace + _WRITE_MARGIN  # the app ends streams at `grace`
    hc.accesslog = None
    hc.errorlog = _HYPERCORN_LOG
    # Also bounds the wait for a request's headers: hypercorn's idle timer runs until they are in.
    hc.keep_alive_timeout = keep_alive
    hc.backlog = 4096  # bursts of new connections must queue, not be reset (capped by somaxconn)
    return hc


class _NoBanner(logging.Filter):
    """hypercorn announces "Running on …" for every server, the mock upstreams' too; Cascade
    says itself which address is the gateway (and which are mocks), so the banner is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on")


_HYPERCORN_LOG = logging.getLogger("cascade.hypercorn")
_HYPERCORN_LOG.addFilter(_NoBanner())


class _TCPServer(hypercorn.trio.tcp_server.TCPServer):
    """hypercorn's connection handler, closing a connection as soon as its client is gone.

    When a client resets its connection, or closes it before the answer is complete, hypercorn
    0.18 sees the end of its input but then waits out the keep-alive timer (75 s by default)
    before it closes its side: every such client held an fd that long, and 1,014 one-shot
    clients exhausted a 1,024-fd limit in 11 s. Here the end of input ends the idle timer.
    """

    _client_closed = False

    async def _read_data(self) -> None:
        await super()._read_data()
        self._client_closed = True
        await self.idle_task.stop()  # idle now: nothing keeps the connection open any more

    async def _idle_timeout(self) -> None:
        if not self._client_closed:
            await super()._idle_timeout()
            return
        with trio.CancelScope(shield=True):  # a request ended after the client's EOF
            await self._initiate_server_close()


# hypercorn's trio worker builds one TCPServer per connection from this module-level name.
hypercorn.trio.run.TCPServer = _TCPServer  # type: ignore[misc]


async def serve_asgi(
    app: object,
    host: str,
    port: int,
    *,
    grace: float = 5.0,
    keep_alive: float = 75.0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    sock: socket.socket | None = None,
    tls: tuple[str, str] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an ASGI app with hypercorn's trio worker; reports the bound URL (port 0 is fine).

    `sock`, when given, is a bound socket to listen on (a worker's SO_REUSEPORT socket); `tls`
    is (certfile, keyfile) to serve HTTPS.
    """
    hc = hypercorn_config(host, port, grace, keep_alive)
    if tls is not None:
        hc.certfile, hc.keyfile = tls
    if sock is not None:  # hypercorn takes the socket over by its fd, and listens on it
        hc.bind = [f"fd://{sock.detach()}"]
    serve = partial(hypercorn.trio.serve, app, hc, mode="asgi")  # type: ignore[arg-type]
    if shutdown_trigger is not None:
        serve = partial(serve, shutdown_trigger=shutdown_trigger)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve)
        task_status.started(binds[0])
