"""A keep-alive HTTP/1.1 connection pool on h11 and trio streams, as an httpx transport.

One pool belongs to one provider actor, so it needs no locks and no cross-task bookkeeping beyond a
semaphore for `max_connections`. Compared with httpcore's pool it skips the per-reuse readability
poll and the connection-matching pass over every queued request (see docs/benchmarks.md); a
reused connection that turns out to have been closed by the server before answering anything is
retried once on a fresh connection, which is what every HTTP client does for a stale keep-alive.

TLS is verified with the system's default context. Bodies are read through a class-based async
iterator (not an async generator), so a cancelled read leaves nothing for the garbage collector.
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import Any

import h11
import httpx
import trio

_READ_SIZE = 65536


class _Connection:
    __slots__ = ("h11", "idle_since", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(_READ_SIZE)
            self.h11.receive_data(bytes(data))  # b"" marks EOF; h11 then reports it

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


class _Body(httpx.AsyncByteStream):
    """The response body; closing it returns the connection to the pool or closes it."""

    def __init__(self, pool: H11Transport, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            event = await conn.next_event()
        except (h11.RemoteProtocolError, OSError, trio.BrokenResourceError) as exc:
            await self.aclose()
            raise httpx.ReadError(str(exc) or "connection lost mid-body") from None
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            await self.aclose()
            raise StopAsyncIteration
        await self.aclose()
        raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in the body")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool._release(conn)


class H11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one origin, keep-alive, at most `max_connections` at once."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._idle: deque[_Connection] = deque()
        self._slots = trio.Semaphore(max_connections)
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        trace = request.extensions.get("trace")
        await self._slots.acquire()
        try:
            conn, reused = await self._take_idle(), True
            if conn is None:
                conn, reused = await self._connect(request.url, timeouts.get("connect")), False
            try:
                return await self._exchange(conn, request, trace)
            except _Stale:
                if not reused:
                    raise httpx.RemoteProtocolError(
                        "server closed the connection without answering"
                    ) from None
                conn = await self._connect(request.url, timeouts.get("connect"))
                try:
                    return await self._exchange(conn, request, trace)
                except _Stale:
                    raise httpx.RemoteProtocolError(
                        "server closed the connection without answering"
                    ) from None
        except BaseException:
            self._slots.release()
            raise

    async def _take_idle(self) -> _Connection | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: warmest, least likely stale
            if now - conn.idle_since < self._keepalive_expiry:
                return conn
            await conn.aclose()  # idle too long: the server may drop it any moment
        return None

    async def _connect(self, url: httpx.URL, connect_timeout: float | None) -> _Connection:
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(connect_timeout if connect_timeout is not None else float("inf")):
                stream = await trio.open_tcp_stream(host, port)
                if url.scheme == "https":
                    context = self._ssl_context or _default_ssl_context()
                    tls = trio.SSLStream(
                        stream, context, server_hostname=host, https_compatible=True
                    )
                    await tls.do_handshake()
                    stream = tls
        except BaseException as exc:
            if stream is not None:  # connected, but the TLS handshake failed or timed out
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise httpx.ConnectTimeout(f"connect to {host}:{port} timed out") from None
            if isinstance(exc, OSError | trio.BrokenResourceError | ssl.SSLError):
                raise httpx.ConnectError(f"connect to {host}:{port} failed: {exc}") from None
            raise
        if isinstance(stream, trio.SocketStream):
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
        return _Connection(stream)

    async def _exchange(
        self, conn: _Connection, request: httpx.Request, trace: Any
    ) -> httpx.Response:
        """Send the request, read the response head; the body stays on the connection."""
        target = request.url.raw_path
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
        headers.insert(0, (b"host", request.url.netloc))
        body = request.content
        if trace is not None:
            await trace("http11.send_request_headers.started", {"request": request})
        h = conn.h11
        try:
            out = h.send(h11.Request(method=request.method, target=target, headers=headers))
            out += h.send(h11.Data(data=body)) if body else b""
            out += h.send(h11.EndOfMessage())
            await conn.stream.send_all(out)
            event = await conn.next_event()
        except BaseException as exc:
            await conn.aclose()
            if isinstance(exc, trio.Cancelled | KeyboardInterrupt | SystemExit):
                raise
            if _nothing_received(h, exc):
                raise _Stale() from None
            raise httpx.ReadError(str(exc) or type(exc).__name__) from None
        if not isinstance(event, h11.Response):
            await conn.aclose()
            if isinstance(event, h11.ConnectionClosed):
                raise _Stale()
            raise httpx.RemoteProtocolError(f"expected a response, got {type(event).__name__}")
        return httpx.Response(
            event.status_code,
            headers=[(bytes(k), bytes(v)) for k, v in event.headers],
            stream=_Body(self, conn),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(event.reason)},
        )

    async def _release(self, conn: _Connection) -> None:
        h = conn.h11
        try:
            if not self._closed and h.our_state is h11.DONE and h.their_state is h11.DONE:
                h.start_next_cycle()
                conn.idle_since = trio.current_time()
                self._idle.append(conn)
            else:  # unfinished (cancelled, failed) or not reusable: never back to the pool
                await conn.aclose()
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            await self._idle.pop().aclose()


def _nothing_received(h: h11.Connection, exc: BaseException) -> bool:
    """True when the server closed or reset the connection before sending any response byte."""
    stale_errors = (
        h11.RemoteProtocolError,
        OSError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    )
    return isinstance(exc, stale_errors) and h.their_state is h11.SEND_RESPONSE


_DEFAULT_SSL: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    global _DEFAULT_SSL
    if _DEFAULT_SSL is None:
        _DEFAULT_SSL = ssl.create_default_context()
        _DEFAULT_SSL.set_alpn_protocols(["http/1.1"])
    return _DEFAULT_SSL
