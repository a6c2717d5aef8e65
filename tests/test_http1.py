"""The upstream HTTP/1.1 pool (actors/http1.py) against a byte-scripted server on 127.0.0.1:0.

The server answers each request with exactly the bytes a test gives it, so framing, keep-alive,
stale connections and malformed answers are tested as they arrive on the wire.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio
import trio.lowlevel

from actors.http1 import HTTP1Transport, _readable
from tests.helpers import TaskSteps, eventually, read_request

# An answer: the bytes to send, then whether to close the connection afterwards.
Script = Callable[[int], tuple[bytes, bool]]


class RawServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []  # each request as received (head and body)
        self.connections = 0
        self.port = 0
        self.closed = trio.Event()  # set when the server has closed a connection

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                read = await read_request(stream, buffer)
                if read is None:
                    return
                request, buffer = read
                self.requests.append(request)
                answer, close = self.script(len(self.requests))
                if answer:
                    await stream.send_all(answer)
                if close:
                    await stream.aclose()
                    self.closed.set()
                    return


@asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[RawServer]:
    server = RawServer(script)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s"
        % (
            extra,
            len(body),
            body,
        )
    )


async def post(
    pool: HTTP1Transport, port: int, body: bytes = b'{"q":1}', headers: dict[str, str] | None = None
) -> tuple[int, httpx.Headers, bytes]:
    request = httpx.Request(
        "POST", f"http://127.0.0.1:{port}/v1/chat/completions", content=body, headers=headers
    )
    with trio.fail_after(5):
        response = await pool.handle_async_request(request)
        parts = [part async for part in response.stream]  # type: ignore[union-attr]
    return response.status_code, response.headers, b"".join(parts)


async def test_keep_alive_reuses_one_connection_and_sends_exact_bytes() -> None:
    async with raw_server(lambda n: (ok(b'{"n":%d}' % n), False)) as server:
        pool = HTTP1Transport()
        for n in (1, 2, 3):
            status, headers, body = await post(pool, server.port, headers={"x-request-id": "r1"})
            assert (status, body, headers["content-type"]) == (
                200,
                b'{"n":%d}' % n,
                "application/json",
            )
        await pool.aclose()
    assert server.connections == 1
    assert server.requests[0] == (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"x-request-id: r1\r\n"
        b"Content-Length: 7\r\n\r\n"
        b'{"q":1}' % server.port
    )


@pytest.mark.parametrize(
    ("answer", "close", "body", "connections"),
    [
        (  # chunked framing, decoded; the connection is kept
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            False,
            b"hello world",
            1,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", True, b"until the end", 2),  # ends with EOF
        (ok(extra=b"connection: close\r\n"), False, b'{"ok":true}', 2),  # honoured
        (ok() + ok(b"unasked"), False, b'{"ok":true}', 2),  # bytes after the answer: not reused
    ],
    ids=["chunked", "close-delimited", "connection-close", "bytes-after-answer"],
)
async def test_framing_and_connection_reuse(
    answer: bytes, close: bool, body: bytes, connections: int
) -> None:
    async with raw_server(lambda n: (answer, close)) as server:
        pool = HTTP1Transport()
        assert (await post(pool, server.port))[2] == body
        assert (await post(pool, server.port))[2] == body
        await pool.aclose()
    assert server.connections == connections


async def test_interim_103_is_skipped() -> None:
    answer = b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + ok(b"real")
    async with raw_server(lambda n: (answer, False)) as server:
        pool = HTTP1Transport()
        status, headers, body = await post(pool, server.port)
        await pool.aclose()
    assert (status, body, "link" in headers) == (200, b"real", False)


async def test_a_keep_alive_connection_the_server_closed_is_not_reused() -> None:
    """The server answers and closes; the pool sees the idle connection readable (EOF) before
    it writes, drops it and sends the next request, once, on a new connection."""
    async with raw_server(lambda n: (ok(), True)) as server:
        pool = HTTP1Transport()
        await post(pool, server.port)
        with trio.fail_after(5):
            await server.closed.wait()  # the server's FIN is on its way to the idle connection
            idle = pool._idle[0].stream
            assert isinstance(idle, trio.SocketStream)
            await trio.lowlevel.wait_readable(idle.socket)  # the FIN has arrived
            assert _readable(idle)
        status, _, body = await post(pool, server.port)
        await pool.aclose()
    assert (status, body) == (200, b'{"ok":true}')
    assert server.connections == 2 and len(server.requests) == 2


async def test_a_delivered_request_is_never_sent_twice() -> None:
    """The server reads the whole second request on a reused connection, then closes without an
    answer: that is the attempt's failure (the call may have been billed), not a resend."""
    async with raw_server(lambda n: (ok(), False) if n != 2 else (b"", True)) as server:
        pool = HTTP1Transport()
        await post(pool, server.port)
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await post(pool, server.port)
        assert (await post(pool, server.port))[0] == 200
        await pool.aclose()
    assert len(server.requests) == 3 and server.connections == 2


@pytest.mark.parametrize(
    ("first_answer", "error", "match"),
    [
        (b"", httpx.RemoteProtocolError, "without answering"),  # a fresh connection: no retry
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part", httpx.ReadError, "mid-body"),
        (b"SMTP ready\r\n\r\n", httpx.RemoteProtocolError, "malformed response"),
    ],
    ids=["closed-unanswered", "cut-mid-body", "garbage"],
)
async def test_broken_answer_is_an_error_and_frees_the_slot(
    first_answer: bytes, error: type[Exception], match: str
) -> None:
    async with raw_server(lambda n: (first_answer, True) if n == 1 else (ok(), False)) as server:
        pool = HTTP1Transport(max_connections=1)
        with pytest.raises(error, match=match):
            await post(pool, server.port)
        assert (await post(pool, server.port))[0] == 200  # the one slot came back
        await pool.aclose()


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\x00b"])
async def test_header_that_would_split_the_request_is_refused_before_connecting(
    value: str,
) -> None:
    async with raw_server(lambda n: (ok(), False)) as server:
        pool = HTTP1Transport()
        with pytest.raises(httpx.LocalProtocolError) as info:
            await post(pool, server.port, headers={"authorization": value})
        await pool.aclose()
    assert "authorization" in str(info.value) and value not in str(info.value)
    assert server.connections == 0


async def test_max_connections_queues_the_rest() -> None:
    release, two_open = trio.Event(), trio.Event()
    opened: list[int] = []

    async with raw_server(lambda n: (ok(), False)) as server:
        pool = HTTP1Transport(max_connections=2)

        async def hold() -> None:
            request = httpx.Request("POST", f"http://127.0.0.1:{server.port}/", content=b"{}")
            response = await pool.handle_async_request(request)
            opened.append(server.connections)
            if len(opened) == 2:
                two_open.set()
            await release.wait()
            await response.aclose()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(hold)
                await two_open.wait()
                await eventually(lambda: pool._slots.statistics().tasks_waiting == 1)
                assert len(opened) == 2  # the third waits for a slot
                release.set()
        await pool.aclose()
    # The third ran on a connection handed back: each short answer had fully arrived with its head.
    assert len(opened) == 3 and server.connections == 2


async def test_an_unfinished_body_closes_its_connection() -> None:
    partial_answer = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part"
    async with raw_server(lambda n: (partial_answer, False) if n == 1 else (ok(), False)) as server:
        pool = HTTP1Transport()
        request = httpx.Request("POST", f"http://127.0.0.1:{server.port}/", content=b"{}")
        with trio.fail_after(5):
            response = await pool.handle_async_request(request)
            assert await response.stream.__aiter__().__anext__() == b"only part"  # type: ignore[union-attr]
            await response.aclose()  # given up mid-body: never back to the pool
        assert (await post(pool, server.port))[0] == 200
        await pool.aclose()
    assert server.connections == 2


async def test_a_request_on_a_kept_connection_waits_only_for_its_answer() -> None:
    """Sending a request on a kept-alive connection costs no scheduling round of its own: the
    read that waits for the answer follows at once and is one (trio's `send_all` yields another
    after a write that did not wait). One round from the call to the answer's head."""
    async with raw_server(lambda n: (ok(), False)) as server:
        pool = HTTP1Transport()
        assert (await post(pool, server.port))[0] == 200  # the connection, kept
        counter = TaskSteps.of_this_task()
        request = httpx.Request("POST", f"http://127.0.0.1:{server.port}/", content=b"{}")
        trio.lowlevel.add_instrument(counter)
        try:
            with trio.fail_after(5):
                response = await pool.handle_async_request(request)
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert response.status_code == 200
        await response.aclose()
        await pool.aclose()
    assert server.connections == 1
    assert counter.steps == 1


async def test_a_cancelled_call_sends_nothing_on_a_kept_connection() -> None:
    """Cancellation is checked before the request is written, as `send_all` does: an attempt
    cancelled before its call (a hedge lost, a client gone) never reaches the upstream, even on
    a connection that needs no connect."""
    async with raw_server(lambda n: (ok(), False)) as server:
        pool = HTTP1Transport()
        assert (await post(pool, server.port))[0] == 200
        request = httpx.Request("POST", f"http://127.0.0.1:{server.port}/", content=b"{}")
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.handle_async_request(request)
        assert scope.cancelled_caught
        assert (await post(pool, server.port))[0] == 200  # the pool still serves
        await pool.aclose()
    assert len(server.requests) == 2
