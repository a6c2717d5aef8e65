"""The one module that talks HTTP to upstreams. Nothing else in Cascade imports httpx.

Each provider actor owns one `Transport` (an httpx client with its own keep-alive pool). httpx's
exceptions are mapped to ours at this edge:

    TransportError            the upstream call failed below HTTP
    ├── ConnectFailed         no connection: refused, DNS, TLS handshake
    ├── ConnectTimeout        no connection within the connect timeout
    └── ConnectionLost        the connection broke after it was made: reset, cut mid-body, garbage

Timeouts other than connect are the actor's business (trio deadlines), not the transport's, so
that one clock governs them all and tests can drive them with trio's autojump clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import httpx
import trio


class TransportError(Exception):
    """The upstream call failed below HTTP."""


class ConnectFailed(TransportError):
    pass


class ConnectTimeout(TransportError):
    pass


class ConnectionLost(TransportError):
    pass


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise ConnectTimeout(str(exc) or "connect timeout") from None
    except httpx.ConnectError as exc:
        raise ConnectFailed(str(exc) or "connection failed") from None
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise ConnectionLost(str(exc) or type(exc).__name__) from None


class UpstreamResponse:
    """Status, headers and a body read chunk by chunk."""

    __slots__ = ("_chunks", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers  # case-insensitive
        # Decoded: we never forward content-encoding, so the bytes must be plain.
        self._chunks: AsyncIterator[bytes] = response.aiter_bytes()

    async def read_chunk(self) -> bytes:
        """The next piece of the body, b"" at its clean end."""
        with _mapped():
            try:
                return await self._chunks.__anext__()
            except StopAsyncIteration:
                return b""

    async def close_body(self) -> None:
        """Finish the body iterator now rather than leave it to the garbage collector."""
        await self._chunks.aclose()  # type: ignore[attr-defined]

    async def read_all(self, limit: int) -> bytes:
        """The rest of the body, up to `limit` bytes (the rest is dropped)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self.read_chunk()):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]


PhaseCallback = Callable[[str], None]


class Transport:
    """An HTTP/1.1 keep-alive client for one upstream base URL."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        max_connections: int,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            transport=http_transport,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            timeout=httpx.Timeout(None, connect=connect_timeout),
            follow_redirects=False,
            trust_env=False,
        )

    @asynccontextmanager
    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str], on_phase: PhaseCallback
    ) -> AsyncIterator[UpstreamResponse]:
        """POST `body`; yields once the response headers are in. Leaving closes the response.

        An unfinished response is closed, not returned to the pool half-read (httpcore drops a
        connection whose response was not read to the end).
        """

        async def trace(name: str, info: Any) -> None:
            if name == "http11.send_request_headers.started":
                on_phase("headers")

        request = self._client.build_request(
            "POST", path, content=body, headers=headers, extensions={"trace": trace}
        )
        with _mapped():
            response = await self._client.send(request, stream=True)
        upstream = UpstreamResponse(response)
        try:
            yield upstream
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5), suppress(httpx.HTTPError):
                await upstream.close_body()
                await response.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self._client.aclose()
