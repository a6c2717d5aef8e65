"""router/web/server.py: how every response byte leaves the gateway.

A write the socket takes at once is made at once, then yields once; one it cannot take at once
is finished by a shielded `send_all`, even if the writer is cancelled meanwhile (a response is
never left half-written on a connection that may be reused). A response's head waits for its
first body part and leaves in the same write. Messages reach the app without a scheduling
round when they can (a queue with room, a message waiting). Real TCP sockets on 127.0.0.1.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import pytest
import trio
import trio.testing

from router.web.asgi import lifespan
from router.web.server import DISCONNECT, _get, _H11Connection, _put, serve_asgi, write
from tests.helpers import TaskSteps

BIG = 32 * 1024 * 1024  # more than loopback's socket buffers hold: the write has to wait for room


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """(the server's side, the client's side) of one TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    try:
        yield server, client
    finally:
        await server.aclose()
        await client.aclose()
        await listeners[0].aclose()


async def read_to_end(stream: trio.SocketStream) -> bytes:
    parts = []
    while chunk := await stream.receive_some(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


async def test_a_write_the_socket_takes_at_once_arrives_and_yields_once() -> None:
    """Once: other connections' I/O is not held up between a response's writes, and no more
    than send_all's own round is paid (hypercorn's lock added a second)."""
    async with connected() as (server, client):
        counter = TaskSteps.of_this_task()
        trio.lowlevel.add_instrument(counter)
        try:
            await write(server, b"data: {}\n\n")
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps == 1
        assert await client.receive_some(100) == b"data: {}\n\n"


async def test_a_cancelled_request_still_writes_what_it_was_given() -> None:
    """As hypercorn's shielded send: no write is refused, or cut, by the writer's cancellation."""
    received: list[bytes] = []
    async with connected() as (server, client), trio.open_nursery() as nursery:

        async def reader() -> None:
            received.append(await read_to_end(client))

        nursery.start_soon(reader)
        with trio.CancelScope() as scope:
            scope.cancel()
            await write(server, b"data: {}\n\n")
            await write(server, b"x" * BIG)
        assert not scope.cancelled_caught
        await server.send_eof()
    assert len(received[0]) == len(b"data: {}\n\n") + BIG


async def test_nothing_to_write_is_no_write() -> None:
    """h11 ends a body with a content-length with b"": it costs nothing, on any stream."""
    left, _right = trio.testing.memory_stream_pair()
    with trio.testing.assert_no_checkpoints():
        await write(left, b"")


async def test_a_write_larger_than_the_socket_holds_arrives_whole_and_in_order() -> None:
    payload = bytes(range(256)) * (BIG // 256)
    async with connected() as (server, client):
        async with trio.open_nursery() as nursery:
            received: list[bytes] = []

            async def reader() -> None:
                received.append(await read_to_end(client))

            nursery.start_soon(reader)
            await write(server, payload)
            await write(server, b"after")
            await server.send_eof()
    assert received == [payload + b"after"]


async def test_a_cancelled_writer_still_finishes_what_it_began() -> None:
    payload = b"x" * BIG
    async with connected() as (server, client):
        scope = trio.CancelScope()
        received: list[bytes] = []

        async def writer() -> None:
            with scope:
                await write(server, payload)
            await server.send_eof()  # the client reads to here: all of it, or what was cut

        async def reader() -> None:
            received.append(await read_to_end(client))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()  # the socket is full: the writer waits
            scope.cancel()
            nursery.start_soon(reader)
    assert len(received[0]) == BIG


async def test_writing_to_a_client_that_is_gone_is_a_broken_stream() -> None:
    async with connected() as (server, client):
        await client.aclose()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the first write may still be taken; the reset follows
                await write(server, b"data: {}\n\n")


async def test_other_streams_write_through_send_all() -> None:
    """TLS streams (any stream but plain TCP) take the shielded send_all: it checkpoints."""
    left, right = trio.testing.memory_stream_pair()
    with trio.testing.assert_checkpoints():
        await write(left, b"hello")
    assert await right.receive_some(100) == b"hello"


REQUEST = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain")],
}
App = Callable[[Any, Any], Awaitable[None]]


@asynccontextmanager
async def served(respond: App) -> AsyncIterator[trio.SocketStream]:
    """A client connection to Cascade's server running `respond(receive, send)` per request."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        else:
            await respond(receive, send)

    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
        client = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        try:
            await client.send_all(REQUEST)
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


def nothing_to_read(stream: trio.SocketStream) -> bool:
    try:
        os.read(stream.socket.fileno(), 1)  # (trio's sockets do not block)
    except BlockingIOError:
        return True
    return False


async def read_until(stream: trio.SocketStream, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = await stream.receive_some(1 << 16)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


async def test_a_response_head_leaves_with_its_first_body_part_in_one_write() -> None:
    """The head is held (ASGI: not sent before a body part) and the two cost one scheduling
    round: hypercorn alone writes them apart, a write and a round each."""
    go, sent = trio.Event(), trio.Event()
    steps: list[int] = []

    async def respond(receive: Any, send: Any) -> None:
        await go.wait()
        counter = TaskSteps.of_this_task()
        trio.lowlevel.add_instrument(counter)
        try:
            await send(START)
            steps.append(counter.steps)
            await send({"type": "http.response.body", "body": b"hi", "more_body": True})
            steps.append(counter.steps)
        finally:
            trio.lowlevel.remove_instrument(counter)
        sent.set()
        await send({"type": "http.response.body", "body": b""})

    with trio.fail_after(10):
        async with served(respond) as client:
            await trio.testing.wait_all_tasks_blocked()
            go.set()
            await sent.wait()
            assert steps == [0, 1]
            head = await read_until(client, b"\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")


async def test_an_answers_last_part_leaves_with_the_end_of_its_body() -> None:
    """A chunked body's end (0 CRLF CRLF) goes in the same write as the last part: that send
    takes one scheduling round, the write's (hypercorn alone writes the two apart, and took
    one more round to tell the app the response is done)."""
    steps: list[int] = []

    async def respond(receive: Any, send: Any) -> None:
        await send(START)
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        counter = TaskSteps.of_this_task()
        trio.lowlevel.add_instrument(counter)
        try:
            await send({"type": "http.response.body", "body": b"bc"})
        finally:
            trio.lowlevel.remove_instrument(counter)
        steps.append(counter.steps)

    with trio.fail_after(10):
        async with served(respond) as client:
            whole = await read_until(client, b"\r\n0\r\n\r\n")
            await trio.testing.wait_all_tasks_blocked()
    assert steps == [1]
    assert whole.endswith(b"1\r\na\r\n2\r\nbc\r\n0\r\n\r\n")


async def test_no_head_is_sent_before_a_body_part() -> None:
    started, release = trio.Event(), trio.Event()

    async def respond(receive: Any, send: Any) -> None:
        await send(START)
        started.set()
        await release.wait()
        await send({"type": "http.response.body", "body": b"late"})

    with trio.fail_after(10):
        async with served(respond) as client:
            await started.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert nothing_to_read(client)
            release.set()
            whole = await read_until(client, b"late\r\n0\r\n\r\n")
    assert whole.startswith(b"HTTP/1.1 200 ")


async def test_an_empty_body_part_sends_the_head_alone() -> None:
    """How an app gets its head out before it has a body (an upstream's "headers, then
    silence"): hypercorn would drop the empty part."""
    release = trio.Event()

    async def respond(receive: Any, send: Any) -> None:
        await send(START)
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"then"})

    with trio.fail_after(10):
        async with served(respond) as client:
            head = await read_until(client, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            release.set()
            assert (await read_until(client, b"\r\n\r\n")).endswith(b"then\r\n0\r\n\r\n")


async def test_an_app_that_fails_after_its_head_sends_the_head_then_closes() -> None:
    """As before the head was held: the client sees the head, then the connection ends (a
    truncated answer, never a silently empty one)."""

    async def respond(receive: Any, send: Any) -> None:
        await send(START)
        raise RuntimeError("the app broke")

    with trio.fail_after(10):
        async with served(respond) as client:
            whole = await read_to_end(client)
    assert whole.startswith(b"HTTP/1.1 200 ")
    assert whole.endswith(b"\r\n\r\n")


async def test_a_finished_request_is_freed_without_the_cyclic_gc() -> None:
    """A request's stream (and all it holds: its scope, its channel to the app) is freed as
    soon as the connection is done with it, by reference counting: it is in no reference cycle
    that the cyclic GC would have to find for every request. Its `cascade.disconnect` notice,
    which refers back to it, stays usable, and says at once that the stream has closed."""
    streams: list[weakref.ref[Any]] = []
    extensions: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        notice = scope["extensions"][DISCONNECT]
        streams.append(weakref.ref(notice["notify"].__self__))
        extensions.append(scope["extensions"])
        await send(START)
        await send({"type": "http.response.body", "body": b"ok"})

    gc.disable()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
                client = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
                for _ in range(2):  # the second request: the connection is done with the first
                    await client.send_all(REQUEST)
                    await read_until(client, b"ok\r\n0\r\n\r\n")
                assert streams[0]() is None
                await client.aclose()
                nursery.cancel_scope.cancel()
    finally:
        gc.enable()
    closed: list[str] = []
    extensions[0][DISCONNECT]["notify"](lambda: closed.append("told"))
    assert closed == ["told"]


async def test_a_message_for_the_app_is_queued_without_a_round_when_there_is_room() -> None:
    put, get = trio.open_memory_channel[str](1)
    with trio.testing.assert_no_checkpoints():
        await _put(put, "http.request")
    assert get.receive_nowait() == "http.request"


async def test_a_message_for_a_full_queue_waits_for_room() -> None:
    """As hypercorn's own put: the connection stops reading until the app has taken one."""
    put, get = trio.open_memory_channel[str](1)
    await _put(put, "first")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_put, put, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert get.statistics().current_buffer_used == 1
        assert get.receive_nowait() == "first"
    assert get.receive_nowait() == "second"


async def test_the_app_takes_a_waiting_message_without_a_round() -> None:
    put, get = trio.open_memory_channel[str](1)
    put.send_nowait("http.request")
    with trio.testing.assert_no_checkpoints():
        assert await _get(get) == "http.request"


async def test_the_app_waits_when_no_message_is_there() -> None:
    put, get = trio.open_memory_channel[str](1)
    got: list[str] = []

    async def app() -> None:
        got.append(await _get(get))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(app)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        put.send_nowait("http.disconnect")
    assert got == ["http.disconnect"]


REQUESTS = {
    "GET, HTTP/1.1": b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
    "POST with a body": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi",
    "HEAD": b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n",
    "HTTP/1.0": b"GET / HTTP/1.0\r\n\r\n",
    "connection: close": b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    "unparsable (answered with an error)": b"GARBAGE\r\n\r\n",  # no HTTP version known
}
RESPONSES = {
    "a stream's head": (200, [("content-type", "text/event-stream"), ("X-Request-Id", "r1")]),
    "no headers": (200, []),
    "content-length": (200, [("content-type", "application/json"), ("content-length", "2")]),
    "chunked, said": (200, [("transfer-encoding", "chunked")]),
    "connection: keep-alive": (200, [("connection", "keep-alive")]),
    "204": (204, [("x-a", "1")]),
    "304": (304, []),
    "502": (502, [("content-type", "application/json")]),
}


def _exchange(conn: h11.Connection, request: bytes, status: int, headers: list[Any]) -> list[Any]:
    """What `conn` writes for the response (and a body part, and its end), or what it raised."""
    conn.receive_data(request)
    try:
        while conn.next_event() is not h11.NEED_DATA and conn.their_state is not h11.DONE:
            pass
    except h11.RemoteProtocolError:
        pass  # a server answers it with an error response, still on this connection
    written: list[Any] = []
    for event in (
        h11.Response(status_code=status, headers=headers),
        h11.Data(data=b"ok"),
        h11.EndOfMessage(),
    ):
        try:
            written.append(conn.send(event))
        except h11.LocalProtocolError as exc:
            written.append(type(exc))
            break
    return [*written, conn.our_state, conn.their_state]


@pytest.mark.parametrize("request_name", list(REQUESTS))
@pytest.mark.parametrize("response_name", list(RESPONSES))
def test_responses_are_framed_as_h11_frames_them(
    request_name: str, response_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's h11 connection writes every response byte for byte as h11's own does:
    heads, chunked or content-length or close-delimited bodies, their ends, the states after.
    A stream's head to an HTTP/1.1 client is framed without h11 validating its headers twice
    more (`set_comma_header` rebuilds and validates the whole list)."""
    import h11._connection

    rebuilt: list[bytes] = []
    original = h11._connection.set_comma_header
    monkeypatch.setattr(
        h11._connection,
        "set_comma_header",
        lambda headers, name, values: rebuilt.append(name) or original(headers, name, values),
    )
    status, headers = RESPONSES[response_name]
    ours = _exchange(_H11Connection(h11.SERVER), REQUESTS[request_name], status, headers)
    ours_rebuilt, rebuilt[:] = list(rebuilt), []
    theirs = _exchange(h11.Connection(h11.SERVER), REQUESTS[request_name], status, headers)
    assert ours == theirs
    if response_name in ("a stream's head", "no headers") and request_name in (
        "GET, HTTP/1.1",
        "POST with a body",
    ):
        assert b"transfer-encoding: chunked" in ours[0].lower()
        assert (ours_rebuilt, rebuilt) == ([], [b"content-length", b"transfer-encoding"])
