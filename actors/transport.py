"""The one module the actors call for upstream HTTP, and the boundary of httpx's exceptions: they
are mapped to ours here, so nothing above sees one (actors/http1.py, the pool, is an httpx
transport; elsewhere httpx appears only as a type, or in the tools' own HTTP clients).

Each provider actor owns one `Transport` and, through it, its own keep-alive pool. httpx's
exceptions are mapped to ours at this edge:

    TransportError            the upstream call failed below HTTP
    ├── ConnectFailed         no connection: refused, DNS, TLS handshake
    ├── ConnectTimeout        no connection within the connect timeout
    └── ConnectionLost        the connection broke after it was made: reset, cut mid-body, garbage

Timeouts other than connect are the actor's business (trio deadlines), not the transport's, so
that one clock governs them all and tests can drive them with trio's autojump clock.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import suppress
from typing import Any

import httpx
import trio

from actors.http1 import HTTP1Transport


class TransportError(Exception):
    """The upstream call failed below HTTP."""


class ConnectFailed(TransportError):
    pass


class ConnectTimeout(TransportError):
    pass


class ConnectionLost(TransportError):
    pass


def _map_error(exc: Exception) -> TransportError:
    """Our exception for an httpx one (a plain function: this runs on the hot path)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return ConnectTimeout(str(exc) or "connect timeout")
    if isinstance(exc, httpx.ConnectError):
        return ConnectFailed(str(exc) or "connection failed")
    return ConnectionLost(str(exc) or type(exc).__name__)


_HTTPX_ERRORS = (httpx.TransportError, httpx.StreamError)


class UpstreamResponse:
    """Status, headers and a body read chunk by chunk."""

    __slots__ = ("_chunks", "finished", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.finished = False  # the body was read to its clean end
        self.headers: Mapping[str, str] = response.headers  # case-insensitive
        # The transport's own byte stream: no decoding layer (we ask for identity encoding) and,
        # with HTTP1Transport, no async generator left behind when a read is cancelled.
        self._chunks: AsyncIterator[bytes] = response.stream.__aiter__()  # type: ignore[union-attr]

    async def read_chunk(self) -> bytes:
        """The next piece of the body, b"" at its clean end."""
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self.finished = True
            return b""
        except _HTTPX_ERRORS as exc:
            raise _map_error(exc) from None

    def at_end(self) -> bool:
        """The body is known to be over without another read (the transport has parsed its
        end already); False when that cannot be known."""
        ended = getattr(self._chunks, "ended", None)
        return self.finished or bool(ended and ended())

    async def close_body(self) -> None:
        """Finish the body iterator now rather than leave it to the garbage collector."""
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def read_all(self, limit: int) -> bytes:
        """The rest of the body, up to `limit` bytes (the rest is dropped)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self.read_chunk()):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]


PhaseCallback = Callable[[str], None]


def proxy_for(base_url: str, setting: str | None) -> httpx.URL | None:
    """The forward proxy for calls to `base_url`: the provider's `proxy` setting (a URL, or "none"
    for a direct connection), else HTTPS_PROXY / HTTP_PROXY (by the upstream's scheme, either
    case, ALL_PROXY as a fallback) unless NO_PROXY names the host, as curl and httpx read them."""
    if setting == "none":
        return None
    if setting is not None:
        return httpx.URL(setting)
    url = httpx.URL(base_url)
    proxies = urllib.request.getproxies_environment()
    chosen = proxies.get(url.scheme) or proxies.get("all")
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not chosen or bypass(url.host, proxies):
        return None
    return httpx.URL(chosen if "://" in chosen else "http://" + chosen)


class Transport:
    """HTTP/1.1 keep-alive calls to one upstream base URL.

    Production uses `HTTP1Transport` (our per-actor pool); tests may pass any httpx transport, such
    as `httpx.MockTransport`. Requests go straight to the transport: none of httpx.AsyncClient's
    middleware (auth, cookies, redirects, hooks) applies to an API gateway's upstream calls.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        max_connections: int,
        http_transport: httpx.AsyncBaseTransport | None = None,
        ca_file: str | None = None,
        proxy: httpx.URL | None = None,
    ) -> None:
        self._base_url = base_url
        # URL and Host header, parsed once per path: parsing costs ~30 us
        self._targets: dict[str, tuple[httpx.URL, tuple[bytes, bytes]]] = {}
        context = None
        if ca_file is not None:
            context = ssl.create_default_context(cafile=ca_file)
            context.set_alpn_protocols(["http/1.1"])
        self._http = http_transport or HTTP1Transport(
            max_connections=max_connections, ssl_context=context, proxy=proxy
        )
        self._extensions_timeout = {"connect": connect_timeout}

    def url(self, path: str) -> str:
        """The URL a call to `path` goes to (what a signature must cover)."""
        return self._base_url + path

    def post(
        self,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        on_phase: PhaseCallback,
    ) -> _Exchange:
        """`async with transport.post(...) as response:` POSTs `body`; the block starts once the
        response headers are in. Leaving it closes the response; an unfinished one is closed,
        never returned to the pool half-read.
        """
        target = self._targets.get(path)
        if target is None:
            url = httpx.URL(self._base_url + path)
            target = self._targets[path] = (url, (b"host", url.netloc))
        url, host = target

        async def trace(name: str, info: Any) -> None:
            if name == "http11.send_request_headers.started":
                on_phase("headers")

        # The body as a ready stream and Host/Content-Length given: httpx skips its own encoding
        # pass, which costs three times as much as the rest of building the request.
        request = httpx.Request(
            "POST",
            url,
            stream=httpx.ByteStream(body),
            headers=[host, (b"content-length", b"%d" % len(body)), *headers],
            extensions={"timeout": self._extensions_timeout, "trace": trace},
        )
        return _Exchange(self._http, request)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self._http.aclose()


class _Exchange:
    """One upstream call as an async context manager (a class: it runs once per attempt)."""

    __slots__ = ("_http", "_request", "_response", "_upstream")

    def __init__(self, http: httpx.AsyncBaseTransport, request: httpx.Request) -> None:
        self._http = http
        self._request = request

    async def __aenter__(self) -> UpstreamResponse:
        try:
            self._response = await self._http.handle_async_request(self._request)
        except _HTTPX_ERRORS as exc:
            raise _map_error(exc) from None
        self._upstream = UpstreamResponse(self._response)
        return self._upstream

    async def __aexit__(self, *exc_info: object) -> None:
        if self._upstream.finished:  # read to its end: the connection is back in the pool
            await self._response.aclose()
            return
        with trio.CancelScope(shield=True), trio.move_on_after(5), suppress(httpx.HTTPError):
            await self._upstream.close_body()
            await self._response.aclose()
