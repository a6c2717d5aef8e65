"""The HTTP server under every ASGI app Cascade runs (the gateway, the mock upstreams): hypercorn's
trio worker, through its public `hypercorn.trio.serve`, with its connection handling and its
HTTP/1.1 writes changed where they cost Cascade time or file descriptors (the classes below).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import types
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h11
import hypercorn.config
import hypercorn.protocol
import hypercorn.protocol.h11
import hypercorn.trio
import hypercorn.trio.run
import hypercorn.trio.task_group
import hypercorn.trio.tcp_server
import trio
from h11._headers import Headers as _H11Headers
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Body, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream

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


class _IdleTimer:
    """hypercorn's idle timer for one connection, as one task whose deadline moves.

    hypercorn 0.18 restarts the timer as a new task each time a connection turns idle (a lock,
    `nursery.start`, a task that is later cancelled) and cancels it each time a request arrives:
    a spawn, a cancellation and several task switches per request. Here the timer is one task for
    the connection's life, and a request's arrival and end only note the time: when the timer's
    deadline passes, it closes the connection if it has been idle the keep-alive time, and
    otherwise sets its deadline to when that could next be true (a keep-alive time after the
    connection turned idle, or from now while a request is in progress). Moving a trio deadline
    costs about 10 k instructions; a busy connection now moves it once per keep-alive time, not
    twice per request. It also closes the connection when the server shuts down and the
    connection is (or next becomes) idle, as hypercorn's does.
    """

    __slots__ = ("_became_idle", "_idle", "_idle_since", "_quiet", "_scope", "_server")

    def __init__(self, server: _TCPServer) -> None:
        self._server = server
        self._scope: trio.CancelScope | None = None
        self._idle = False
        self._idle_since = -math.inf
        self._quiet = False  # ended because the client left: the server side closes anyway
        self._became_idle: trio.Event | None = None  # set when idle again, during shutdown

    async def restart(
        self, task_group: hypercorn.trio.task_group.TaskGroup, action: object
    ) -> None:
        """The connection is idle: no request in progress."""
        if self._server.client_closed:  # a request that ended after its client left: close now
            task_group._nursery.start_soon(self._server.close_now)  # type: ignore[union-attr]
            return
        self._idle = True
        self._idle_since = trio.current_time()
        if self._scope is None:
            keep_alive = self._server.config.keep_alive_timeout
            self._scope = trio.CancelScope(deadline=self._idle_since + keep_alive)
            task_group._nursery.start_soon(self._run)  # type: ignore[union-attr]
        if self._became_idle is not None:
            self._became_idle.set()

    async def stop(self) -> None:
        """A request is in progress: the timer waits for it (`_run`)."""
        self._idle = False

    def client_gone(self) -> None:
        """The client has closed its side: the timer ends; closing is the connection's own."""
        self._idle = False
        if self._scope is not None:
            self._quiet = True
            self._scope.cancel()

    async def _run(self) -> None:
        keep_alive = self._server.config.keep_alive_timeout
        while True:
            assert self._scope is not None
            with self._scope:
                await self._server.context.terminated.wait()
                while not self._idle:  # shutting down mid-request: close once it is answered
                    self._became_idle = trio.Event()
                    await self._became_idle.wait()
            if self._quiet or not self._scope.cancelled_caught:
                break  # the client left, or the server shuts down and the connection is idle
            now = trio.current_time()
            if self._idle and now >= self._idle_since + keep_alive:
                break  # idle for the keep-alive time
            since = self._idle_since if self._idle else now  # (busy: look again a while later)
            self._scope = trio.CancelScope(deadline=since + keep_alive)
        if not self._quiet:  # idle for the keep-alive time, or idle at shutdown
            await self._server.close_now()


async def write(stream: trio.abc.SendStream, data: bytes | memoryview) -> None:
    """Write all of `data`; what was begun is finished even if the caller is cancelled.

    hypercorn writes each piece of a response as lock (its acquire yields a scheduling round),
    shielded cancel scope and `send_all` (another round, after trio's socket machinery): for a
    relayed stream that is every event. On a plain TCP stream this writes to the socket at once
    and, if the kernel took everything (the usual case), yields once, as `send_all` would:
    without that schedule point a response's writes would hold trio's run loop and delay every
    other connection's I/O (at c=64 over a 50 ms upstream, a fifth of the throughput). What the
    kernel did not take (a client slower than its answer) goes through the shielded `send_all`,
    which waits for room. TLS streams always take that path. Nothing to write (h11's end of a
    body with a content-length) is no write at all.
    """
    if not data:
        return
    if type(stream) is trio.SocketStream:
        try:
            sent = os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # reset, broken pipe, or closed (fileno -1)
            raise trio.BrokenResourceError(str(exc)) from exc
        if sent == len(data):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        data = memoryview(data)[sent:]
    with trio.CancelScope(shield=True):
        await stream.send_all(data)


class _TCPServer(hypercorn.trio.tcp_server.TCPServer):
    """hypercorn's connection handler with three changes: a connection is closed as soon as its
    client is gone, its idle timer is one task per connection (`_IdleTimer`), and a write that
    the socket takes at once costs one scheduling round, not two and a cancel scope (`write`).

    When a client resets its connection, or closes it before the answer is complete, hypercorn
    0.18 sees the end of its input but then waits out the keep-alive timer (75 s by default)
    before it closes its side: every such client held an fd that long, and 1,014 one-shot
    clients exhausted a 1,024-fd limit in 11 s. Here the end of input ends the idle timer, and a
    request still in progress closes the connection when it ends.
    """

    client_closed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = _IdleTimer(self)  # type: ignore[assignment]

    async def _read_data(self) -> None:
        await super()._read_data()
        self.client_closed = True
        self.idle_task.client_gone()  # type: ignore[attr-defined]

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        lock = self.send_lock  # one write at a time, in order, as hypercorn's
        try:
            lock.acquire_nowait()  # (`async with` would yield a scheduling round here)
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await write(self.stream, event.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
        finally:
            lock.release()

    async def close_now(self) -> None:
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


class _H11Connection(h11.Connection):
    """h11's server side, which frames a response of unknown length (a stream) without
    validating its headers twice more.

    h11 validates every header of a response when the event is made (hypercorn makes it). To
    send one with neither Content-Length nor Transfer-Encoding to an HTTP/1.1 client, it then
    sets its framing header with `set_comma_header` twice (Content-Length removed, chunked
    added), and each call validates the whole list again: with a stream's eight headers, 5% of
    a 20-event stream's instructions. That case is done here by adding the one header h11 adds,
    to the list it has validated; every other case is h11's own. The method and the attributes
    it reads are h11's private ones (h11 is pinned to 0.16 for them), and the result is checked
    against h11's own in tests/test_server_writes.py.
    """

    def _clean_up_response_headers_for_sending(self, response: h11.Response) -> h11.Response:
        version = self.their_http_version
        if (
            type(response) is h11.Response
            and self._cstate.keep_alive
            and version is not None
            and version >= b"1.1"
            and self._request_method not in (b"HEAD", b"CONNECT")
            and response.status_code not in (204, 304)
        ):
            items = response.headers._full_items
            if all(name not in _FRAMING for _, name, _ in items):
                return h11.Response(
                    headers=_H11Headers([*items, _CHUNKED]),
                    status_code=response.status_code,
                    http_version=response.http_version,
                    reason=response.reason,
                )
        return super()._clean_up_response_headers_for_sending(response)


_FRAMING = (b"content-length", b"transfer-encoding")
_CHUNKED = (b"Transfer-Encoding", b"transfer-encoding", b"chunked")  # as h11 adds it


class _H11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, holding a response's head until its first body event and
    an answer's last body part until its end, so that each pair leaves in one write.

    hypercorn writes the head as soon as the app sends `http.response.start`, the body with the
    next message, and a chunked body's end (`0\\r\\n\\r\\n`) apart from the last part: a write
    and a scheduling round more than needed for every answer, and one more again for a
    streamed one, though an app almost always sends its first body at once. ASGI lets
    a server wait: it "must not start sending the response to the client until it has received
    at least one response body event". An app that wants its head out before it has a body
    sends an empty body part (`more_body: True`), which `_HTTPStream` turns into a body event
    that writes nothing but the held head. Anything else the protocol sends (an error response,
    the close) sends what is held first, so no byte is lost or reordered.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection = _H11Connection(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )
        self._write = self.send
        self.send = self._send
        self._holding = False
        self._held: bytes | None = None

    async def stream_send(self, event: StreamEvent) -> None:
        kind = type(event)
        if (kind is Response and event.status_code >= 200) or (  # type: ignore[attr-defined]
            kind is Body and getattr(self.stream, "ending", False)
        ):
            self._holding = True
            try:
                await super().stream_send(event)
            finally:
                self._holding = False
        else:
            await super().stream_send(event)

    async def _send(self, event: Event) -> None:
        held = self._held
        if self._holding and type(event) is RawData:
            self._held = event.data if held is None else held + event.data
            return
        if held is not None:
            self._held = None
            if type(event) is RawData:
                event = RawData(data=held + event.data)
            else:
                await self._write(RawData(data=held))
        await self._write(event)


DISCONNECT = "cascade.disconnect"  # the ASGI scope extension of `_HTTPStream.notify_close`


class _HTTPStream(HTTPStream):
    """hypercorn's ASGI HTTP stream, where an empty body part becomes a body event that
    writes nothing but the held head (hypercorn drops an empty part), and the last body part
    is marked `ending`: its end follows at once (no trailers), to leave in the same write.

    It also offers the app, as the scope extension `cascade.disconnect` ({"notify": f}), a
    call when the stream closes: `f(callback)` has `callback()` called at once when the
    client has gone or the response is done (or now, if that has already happened). The ASGI
    way is a task per request that waits on `receive()` for `http.disconnect` (still sent):
    a spawn and two scheduling rounds for every request."""

    ending = False
    _on_close: Callable[[], None] | None = None

    def notify_close(self, callback: Callable[[], None]) -> None:
        if self.closed:
            callback()
        else:
            self._on_close = callback

    async def handle(self, event: StreamEvent) -> None:
        if type(event) is StreamClosed and not self.closed:
            # The scope's `notify` refers to this stream, which holds the scope: a cycle the
            # GC would have to find for every request. Once closed, `notify` needs no stream.
            self.scope["extensions"][DISCONNECT] = _CLOSED
            if self._on_close is not None:
                callback, self._on_close = self._on_close, None
                callback()
        await super().handle(event)

    async def app_send(self, message: Any) -> None:
        if message is not None and message["type"] == "http.response.body":
            if self.state == ASGIHTTPState.RESPONSE and not message.get("more_body", False):
                self.ending = not self.response.get("trailers", False)
            elif not message.get("body") and self.state == ASGIHTTPState.RESPONSE:
                await self.send(Body(stream_id=self.stream_id, data=b""))
                return
        await super().app_send(message)


def _call_now(callback: Callable[[], None]) -> None:
    callback()


_CLOSED = {"notify": _call_now}  # a closed stream's `cascade.disconnect`


class _TaskGroup(hypercorn.trio.task_group.TaskGroup):
    """hypercorn's per-connection task group, whose channel to the app passes a message
    without a scheduling round when it can: hypercorn's channel takes one on each side for
    every request body and every `http.disconnect` (`send` when the queue has room, `receive`
    when a message is waiting), though each task reaches a real wait soon after (the
    connection's next read; the app's call upstream, or the end of its response)."""

    async def spawn_app(
        self, app: Any, config: Any, scope: Any, send: Any
    ) -> Callable[[Any], Awaitable[None]]:
        stream = getattr(send, "__self__", None)  # the stream's app_send
        if isinstance(stream, _HTTPStream):
            scope["extensions"][DISCONNECT] = {"notify": stream.notify_close}
        put = await super().spawn_app(_AppReceive(app), config, scope, send)
        return partial(_put, put.__self__)  # type: ignore[attr-defined]


class _AppReceive:
    """The app, given a `receive` that takes a queued message without a scheduling round."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(
        self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any
    ) -> None:
        await self.app(scope, partial(_get, receive.__self__), send, sync_spawn, call_soon)


async def _get(channel: trio.MemoryReceiveChannel[Any]) -> Any:
    try:
        return channel.receive_nowait()
    except trio.WouldBlock:
        return await channel.receive()


async def _put(channel: trio.MemorySendChannel[Any], message: Any) -> None:
    try:
        channel.send_nowait(message)
    except trio.WouldBlock:
        await channel.send(message)


_ACCEPT_BURST = 64  # connections taken from the backlog in one scheduling round, at most


class _Listener(trio.abc.Listener[trio.SocketStream]):
    """A listening socket that takes the connections already in its backlog in one scheduling
    round, not one per round.

    `trio.serve_listeners` accepts in a loop, and trio's accept yields a round after each
    connection. On a busy server a round is long, so a burst of new clients (a load test's
    start, clients reconnecting at once) waited for every connection before theirs to be taken
    a round apart: at c=256 over a 50 ms upstream, a p99 of 0.7-1.2 s where Cascade's own
    handling of each request stayed under 0.5 s. The rest of the backlog is taken from a
    duplicate of the listening socket's descriptor (the same socket, nonblocking), up to
    _ACCEPT_BURST a round; errors are left to the next `accept` of trio's, which handles them.
    """

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self._backlog = socket.socket(fileno=os.dup(listener.socket.fileno()))
        self._backlog.setblocking(False)
        self._accepted: deque[trio.SocketStream] = deque()

    async def accept(self) -> trio.SocketStream:
        if self._accepted:
            return self._accepted.popleft()  # taken in an earlier round
        stream = await self.listener.accept()
        while len(self._accepted) < _ACCEPT_BURST - 1:
            try:
                sock, _ = self._backlog.accept()
            except OSError:  # empty (EAGAIN), or an error trio's accept will meet and handle
                break
            self._accepted.append(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
        return stream

    async def aclose(self) -> None:
        self._backlog.close()
        while self._accepted:
            await trio.aclose_forcefully(self._accepted.popleft())
        await self.listener.aclose()


async def _serve_listeners(handler: Any, listeners: list[Any], **kwargs: Any) -> None:
    """trio.serve_listeners, each plain listening socket taking its backlog in one round."""
    wrapped = [_Listener(x) if type(x) is trio.SocketListener else x for x in listeners]
    await trio.serve_listeners(handler, wrapped, **kwargs)


class _TrioForHypercorn(types.ModuleType):
    """trio as hypercorn's worker sees it: trio itself, but for `serve_listeners`."""

    serve_listeners = staticmethod(_serve_listeners)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


# hypercorn's trio worker builds one TCPServer per connection, each connection its task group
# and its HTTP/1.1 protocol, and each request its stream, from these module-level names; it
# serves its listening sockets with `trio.serve_listeners`, read from its own module's `trio`.
hypercorn.trio.run.TCPServer = _TCPServer  # type: ignore[misc]
hypercorn.trio.run.trio = _TrioForHypercorn("trio")
hypercorn.protocol.H11Protocol = _H11Protocol  # type: ignore[misc]
hypercorn.protocol.h11.HTTPStream = _HTTPStream  # type: ignore[misc]
hypercorn.trio.tcp_server.TaskGroup = _TaskGroup  # type: ignore[misc]


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
