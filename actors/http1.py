"""A keep-alive HTTP/1.1 connection pool on trio streams, as an httpx transport.

One pool belongs to one provider actor, so it needs no locks and no cross-task bookkeeping beyond a
semaphore for `max_connections`. Compared with httpcore's pool it skips the connection-matching
pass over every queued request (see docs/benchmarks.md).

A request is never sent twice. Before an idle connection is reused it is polled, as httpcore
does: one that is readable (the server closed it, or sent bytes nobody asked for) is dropped
before anything is written, and the request goes out on another. Once the request is written,
any failure (the server closing without an answer included) is the attempt's failure, for the
dispatcher to judge: an LLM call may have been billed, and the dispatcher is the only retry loop (docs/architecture.md).

Responses are parsed by httptools (llhttp, the parser behind Node.js and uvicorn): a full
request/response cycle costs ~2 us of CPU against ~85 us with h11, which on the gateway's hot path
was the largest single cost after the server itself. Requests are serialised here; every header
name and value is checked first, so nothing a config or a client supplies can split a header.

TLS is verified with the system's default context. Bodies are read through a class-based async
iterator (not an async generator), so a cancelled read leaves nothing for the garbage collector.
"""

from __future__ import annotations

import base64
import os
import re
import select
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools
import httpx
import trio

_READ_SIZE = 65536
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKENS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:,[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
_FIELD_VALUE = re.compile(rb"[^\x00\r\n]*")


def header_problem(name: str, value: str) -> str | None:
    """Why this header could not be sent as it is, or None: the rules `_serialise_head` enforces.

    Config validation and the provider actor check static headers and keys with it up front.
    """
    try:
        raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
    except UnicodeEncodeError:
        return "must be Latin-1 text"
    if _TOKEN.fullmatch(raw_name) is None:
        return "not a valid HTTP header name"
    if _FIELD_VALUE.fullmatch(raw_value) is None:
        return "the value may not contain CR, LF or NUL"
    return None


class _Connection:
    """One connection and the parser of the response it is reading (httptools callbacks)."""

    __slots__ = (
        "body",
        "complete",
        "framed",
        "head_done",
        "headers",
        "idle_since",
        "keep_alive",
        "messages",
        "parser",
        "received",
        "status",
        "stream",
    )

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        """Ready for the next response on this connection."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.framed = False  # Content-Length or chunked: EOF before the end is a cut
        self.messages = 0
        self.received = 0

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:  # bytes after the answer: the connection is not reused (`messages`)
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints): the real one follows
            self.headers = []
            self.messages -= 1
            return
        self.status = status
        self.head_done = True
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self.framed = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.head_done and not self.complete:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # only valid until this returns

    async def receive(self) -> bool:
        """Read once and parse; False at EOF."""
        data = await self.stream.receive_some(_READ_SIZE)
        if not data:
            return False
        self.received += len(data)
        self.parser.feed_data(data)
        return True

    @property
    def reusable(self) -> bool:
        return self.keep_alive and self.messages == 1

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


class _Body(httpx.AsyncByteStream):
    """The response body; closing it returns the connection to the pool or closes it.

    Each read returns everything parsed so far, so a burst of upstream events is one chunk.
    """

    def __init__(self, pool: HTTP1Transport, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        while not conn.body:
            if conn.complete:
                await self.aclose()
                raise StopAsyncIteration
            try:
                more = await conn.receive()
            except (httptools.HttpParserError, OSError, trio.BrokenResourceError) as exc:
                await self.aclose()
                raise httpx.ReadError(str(exc) or "connection lost mid-body") from None
            if not more:
                if conn.framed:
                    await self.aclose()
                    raise httpx.ReadError("connection closed mid-body")
                conn.complete = True  # a body delimited by the end of the connection
        parts = conn.body
        conn.body = []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def ended(self) -> bool:
        """The whole body has been parsed and handed out: the next read is its end."""
        conn = self._conn
        return conn is None or (conn.complete and not conn.body)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool._release(conn)


class HTTP1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one origin, keep-alive, at most `max_connections` at once."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        proxy: httpx.URL | None = None,
    ) -> None:
        self._idle: deque[_Connection] = deque()
        self._slots = trio.Semaphore(max_connections)
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._closed = False
        # An http:// proxy: plain-HTTP origins are asked through it in absolute form, HTTPS ones
        # through a CONNECT tunnel. Its credentials (user:password in the URL) go in
        # Proxy-Authorization, built once here.
        self._proxy = proxy
        self._proxy_auth: bytes | None = None
        if proxy is not None and proxy.userinfo:
            user, _, password = proxy.userinfo.partition(b":")
            credentials = base64.b64encode(
                unquote_to_bytes(user) + b":" + unquote_to_bytes(password)
            )
            self._proxy_auth = b"Basic " + credentials

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        forward = self._proxy is not None and request.url.scheme == "http"
        # Before any I/O: a bad header costs no connection.
        head = _serialise_head(request, absolute=forward, proxy_auth=self._proxy_auth)
        if not isinstance(request.stream, httpx.ByteStream):
            await request.aread()
        timeouts = request.extensions.get("timeout", {})
        trace = request.extensions.get("trace")
        try:  # a free slot is taken without a scheduling round; the I/O below yields anyway
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            conn = await self._take_idle()
            if conn is None:
                conn = await self._connect(request.url, timeouts.get("connect"))
            return await self._exchange(conn, head, request, trace)
        except BaseException:
            self._slots.release()
            raise

    async def _take_idle(self) -> _Connection | None:
        """An idle connection that can carry a request: not expired, and not readable (an idle
        connection with something to read was closed by the server, or is out of step)."""
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: warmest, least likely stale
            if now - conn.idle_since < self._keepalive_expiry and not _readable(conn.stream):
                return conn
            await conn.aclose()  # idle too long (the server may drop it any moment), or closed
        return None

    async def _connect(self, url: httpx.URL, connect_timeout: float | None) -> _Connection:
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        stream: trio.abc.Stream | None = None
        proxy = self._proxy
        https = url.scheme == "https"
        try:
            with trio.fail_after(connect_timeout if connect_timeout is not None else float("inf")):
                if proxy is None:
                    stream = await trio.open_tcp_stream(host, port)
                else:
                    stream = await trio.open_tcp_stream(proxy.host, proxy.port or 80)
                    if https:
                        await self._tunnel(stream, host, port)
                if https:
                    stream = await self._tls(stream, host)
        except BaseException as exc:
            if stream is not None:  # connected, but the TLS handshake failed or timed out
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise httpx.ConnectTimeout(f"connect to {host}:{port} timed out") from None
            if isinstance(exc, OSError | trio.BrokenResourceError | ssl.SSLError):
                via = f" through the proxy {proxy.host}:{proxy.port or 80}" if proxy else ""
                raise httpx.ConnectError(f"connect to {host}:{port}{via} failed: {exc}") from None
            raise
        if isinstance(stream, trio.SocketStream):
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
        return _Connection(stream)

    async def _tls(self, stream: trio.abc.Stream, host: str) -> trio.SSLStream[trio.abc.Stream]:
        context = self._ssl_context or _default_ssl_context()
        tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
        await tls.do_handshake()  # on failure the caller closes `stream`, the connection
        return tls

    async def _tunnel(self, stream: trio.abc.Stream, host: str, port: int) -> None:
        """Ask the proxy for a tunnel to host:port (CONNECT); OSError when it refuses."""
        authority = b"%s:%d" % (host.encode("ascii"), port)
        lines = [b"CONNECT %s HTTP/1.1\r\n" % authority, b"host: %s\r\n" % authority]
        if self._proxy_auth is not None:
            lines.append(b"proxy-authorization: %s\r\n" % self._proxy_auth)
        await stream.send_all(b"".join([*lines, b"\r\n"]))
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = await stream.receive_some(_READ_SIZE)
            if not data or len(answer) > 65536:
                raise OSError("the proxy closed the connection during CONNECT")
            answer += data
        status_line = answer.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if (
            len(parts) < 2
            or not parts[1].startswith(b"2")
            or answer.index(b"\r\n\r\n") + 4 != len(answer)
        ):
            raise OSError(f"the proxy refused CONNECT: {status_line[:100].decode('latin-1')}")

    async def _exchange(
        self, conn: _Connection, head: bytes, request: httpx.Request, trace: Any
    ) -> httpx.Response:
        """Send the request, read the response head; the body stays on the connection."""
        if trace is not None:
            await trace("http11.send_request_headers.started", {"request": request})
        conn.reset()
        try:
            await _send(conn.stream, head + _body(request))
            while not conn.head_done:
                if not await conn.receive():
                    if conn.received == 0:
                        raise httpx.RemoteProtocolError(
                            "server closed the connection without answering"
                        )
                    raise httpx.RemoteProtocolError("connection closed before the response head")
        except BaseException as exc:
            await conn.aclose()
            if isinstance(exc, httpx.RemoteProtocolError | trio.Cancelled):
                raise
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit
            if isinstance(exc, httptools.HttpParserError):
                raise httpx.RemoteProtocolError(f"malformed response: {exc}") from None
            raise httpx.ReadError(str(exc) or type(exc).__name__) from None
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, conn),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _release(self, conn: _Connection) -> None:
        try:
            if not self._closed and conn.reusable:
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


def _readable(stream: trio.abc.Stream) -> bool:
    """Whether the socket under `stream` has something to read (or is closed): a zero-timeout
    poll, as httpcore's `is_socket_readable`. A stream without a socket counts as readable."""
    while not isinstance(stream, trio.SocketStream):
        inner = getattr(stream, "transport_stream", None)
        if inner is None:
            return True
        stream = inner
    fd = stream.socket.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


async def _send(stream: trio.abc.Stream, data: bytes | memoryview) -> None:
    """Send a request. Cancellation is checked first, as `send_all` does: a cancelled attempt
    never reaches the upstream. What a plain socket takes at once then goes without the
    scheduling round `send_all` yields after a write that did not wait: the read that waits
    for the answer follows at once, and is a round of its own. The rest of a request the
    socket did not take, and any TLS stream, go through `send_all`."""
    await trio.lowlevel.checkpoint_if_cancelled()
    if type(stream) is trio.SocketStream:
        try:
            sent = os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    await stream.send_all(data)


def _body(request: httpx.Request) -> bytes:
    stream = request.stream
    if isinstance(stream, httpx.ByteStream):  # what actors/transport.py sends: no async read
        return b"".join(stream)
    return request.content  # read by `handle_async_request` for any other kind of body


def _serialise_head(
    request: httpx.Request, *, absolute: bool = False, proxy_auth: bytes | None = None
) -> bytes:
    """The request line and headers. httpx supplies Host and Content-Length from the request.

    `absolute`: the request goes to a forward proxy, which wants the whole URL in the request
    line and, if it asks for credentials, Proxy-Authorization.
    """
    raw = request.headers.raw
    names = [name for name, _ in raw]
    values = [value for _, value in raw]
    # One scan each: names joined with "," are all tokens only if each is; no value may hold a
    # CR, LF or NUL. Only then find the culprit, and name it without echoing its value.
    if (
        _TOKENS.fullmatch(b",".join(names)) is None
        or _FIELD_VALUE.fullmatch(b"".join(values)) is None
    ):
        for name, value in raw:
            if _TOKEN.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
                raise httpx.LocalProtocolError(f"invalid header {name!r}: refusing to send it")
    url = request.url
    target = b"%s://%s%s" % (url.raw_scheme, url.netloc, url.raw_path) if absolute else url.raw_path
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), target)]
    if b"host" not in (name.lower() for name in names):  # absent when built with a stream
        lines.append(b"host: %s\r\n" % url.netloc)
    if absolute and proxy_auth is not None:
        lines.append(b"proxy-authorization: %s\r\n" % proxy_auth)
    lines += [b"%s: %s\r\n" % pair for pair in raw]
    lines.append(b"\r\n")
    return b"".join(lines)


_DEFAULT_SSL: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    global _DEFAULT_SSL
    if _DEFAULT_SSL is None:
        _DEFAULT_SSL = ssl.create_default_context()
        _DEFAULT_SSL.set_alpn_protocols(["http/1.1"])
    return _DEFAULT_SSL
