"""Client connections at the server's edge: closed when the client closes, bounded in time while a
request arrives, and the open-file limit raised (real sockets on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from router.serving.server import raise_fd_limit
from router.web.server import _IdleTimer
from tests.helpers import chat, eventually
from tests.live import Exchange, FakeUpstream, answers, live_gateway

REQUEST = b"GET /healthz HTTP/1.1\r\nhost: cascade\r\n\r\n"
_CHAT = json.dumps(chat()).encode()
CHAT_REQUEST = (  # a model request, as raw bytes
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: c\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_CHAT), _CHAT)
)


async def read_answer(stream: trio.SocketStream) -> bytes:
    data = b""
    while b'{"status":"ok"}' not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, "the server closed before answering"
        data += chunk
    return data


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("how", ["reset", "close_without_reading"])
async def test_a_connection_is_closed_at_once_when_its_client_is_gone(how: str) -> None:
    """Clients that reset the connection, or close it before reading the answer: the server
    closes its side at once instead of holding the fd for the keep-alive time (75 s here), which
    let one-shot clients exhaust a 1,024-fd limit in seconds (issue 9.4)."""
    with trio.fail_after(10):
        async with live_gateway({"a": FakeUpstream(answers)}) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            before = open_fds()
            for _ in range(20):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(CHAT_REQUEST)
                if how == "reset":
                    answer = b""
                    while b'"usage"' not in answer:
                        answer += await stream.receive_some(65536)
                    linger = struct.pack("ii", 1, 0)  # close with RST
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                await stream.aclose()
            # Polled (bounded): the server's fds have no event to wait on. At most the gateway's
            # pooled upstream connection and the fake upstream's end of it remain.
            await eventually(lambda: open_fds() <= before + 2)


async def test_an_idle_connection_closes_after_keep_alive_timeout() -> None:
    with trio.fail_after(10):
        async with live_gateway(
            {"a": FakeUpstream(answers)}, server={"keep_alive_timeout": "300ms"}
        ) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(REQUEST)
                await read_answer(stream)
                opened = trio.current_time()
                assert await stream.receive_some(1) == b""  # kept open, then closed by the server
                assert trio.current_time() - opened >= 0.3
            async with await trio.open_tcp_stream("127.0.0.1", port) as partial:
                await partial.send_all(REQUEST[:10])  # headers that never finish
                assert await partial.receive_some(1) == b""


async def test_keep_alive_counts_from_the_last_answer_and_never_cuts_a_request() -> None:
    """The idle timer stops while a request is in progress (one slower than the keep-alive time
    is answered whole) and restarts at each answer's end (the connection closes a keep-alive
    time after the last one, not the first)."""

    async def slow(exchange: Exchange) -> None:
        await trio.sleep(0.5)
        await answers(exchange)

    with trio.fail_after(10):
        async with live_gateway(
            {"a": FakeUpstream(slow)}, server={"keep_alive_timeout": "300ms"}
        ) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(CHAT_REQUEST)
                answer = b""
                while b'"usage"' not in answer:
                    chunk = await stream.receive_some(65536)
                    assert chunk, "the server closed the connection mid-request"
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 ")
                await trio.sleep(0.2)  # idle, but for less than the keep-alive time
                await stream.send_all(REQUEST)
                await read_answer(stream)
                answered = trio.current_time()
                assert await stream.receive_some(1) == b""
                assert trio.current_time() - answered >= 0.3


class _Connection:
    """What `_IdleTimer` uses of hypercorn's TCPServer and its task group, and when it closed."""

    def __init__(self, keep_alive: float, nursery: trio.Nursery) -> None:
        self.config = SimpleNamespace(keep_alive_timeout=keep_alive)
        self.context = SimpleNamespace(terminated=trio.Event())
        self.client_closed = False
        self._nursery = nursery  # (as the task group)
        self.closed_at: float | None = None

    async def close_now(self) -> None:
        self.closed_at = trio.current_time()


async def test_the_keep_alive_timer_closes_exactly_a_keep_alive_after_the_last_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request's start and end only note the time; each time the timer's deadline passes, it
    looks again at when the connection turned idle. Keep-alive 10 s: idle at 0, requests from 4
    to 16 and from 19 to 21. Its deadline passes at 10 and 20 mid-request, and at 30 idle for
    9 s only: the connection closes at 31, exactly 10 s after the last answer."""
    async with trio.open_nursery() as nursery:
        connection = _Connection(10.0, nursery)
        timer = _IdleTimer(connection)  # type: ignore[arg-type]
        group: Any = connection
        await timer.restart(group, None)
        for busy, idle in ((4, 16), (19, 21)):
            await trio.sleep_until(busy)
            await timer.stop()
            await trio.sleep_until(idle)
            await timer.restart(group, None)
        await trio.sleep(60)
    assert connection.closed_at == 31.0


async def test_a_body_that_never_arrives_is_a_408() -> None:
    """Headers and one body byte, then silence: 408 after server.body_timeout, and the provider
    is never called (issue 9.9)."""
    up = FakeUpstream(answers)
    with trio.fail_after(10):
        async with live_gateway({"a": up}, server={"body_timeout": "300ms"}) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: cascade\r\n"
                    b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
                )
                answer = b""
                while chunk := await stream.receive_some(65536):  # closed after the 408
                    answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"did not arrive within 0.3 s" in answer
    assert up.exchanges == []


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        assert raise_fd_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
