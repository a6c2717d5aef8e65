"""Writing what a client gets back: plain answers, relayed streams, and the cascade's errors, in
the client's dialect (router/dialects/), whatever dialect the provider that served spoke.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager

import attrs
import trio

from actors.messages import Demand, Failed, Reply, Response, StreamEnd, StreamEvents, StreamStart
from actors.outcome import INCOMPLETE_STREAM
from actors.sse import SSEEvent
from actors.wire import Usage
from router.cascade.dispatcher import CascadeError, Dispatch, Winner
from router.config import Target
from router.dialects import translate
from router.dialects.base import ClientRequest, Dialect, StreamWriter
from router.dialects.pairs import translator
from router.web.asgi import Message, Receive, Send

JSON = b"application/json"
_UPSTREAM_END_GRACE = 2.0


@attrs.define
class Delivery:
    """What reached the client, filled in as it is written, so that a request cancelled half-way
    still knows what it delivered: the pipeline's record step (settlement, metrics, the log)
    reads it once the request has ended, however it ended."""

    target: Target | None = None  # the target that served
    first_byte: float | None = None  # trio time the answer's first byte went to the server
    answer: Response | None = None  # a whole answer, as the provider sent it
    usage: Usage | None = None  # a stream's usage, when its end said
    completed: bool = False  # a stream that ended with its dialect's end of answer
    # Metered requests (a client key's): the content relayed so far, in characters, counted by
    # the upstream dialect's `count` (what a stream that ends without its usage is charged for)
    metered: bool = False
    count: Callable[[Sequence[SSEEvent]], int] | None = None
    content: int = 0
    # Run once the answer is whole, before its end is sent (the Responses face stores it)
    on_whole: Callable[[], Awaitable[None]] | None = None
    resumes: Resumes | None = None  # a stream on a route that resumes


@attrs.define
class Resumes:
    """A resumable stream's record (router/face/resuming.py): what the attempts before the one
    that streams now used, the continuations' cascades, one entry per resume tried."""

    earlier: Usage = attrs.Factory(Usage)
    cascades: list[Dispatch] = attrs.Factory(list)
    tried: list[dict[str, object]] = attrs.Factory(list)

    @property
    def calls(self) -> int:
        return sum(d.calls for d in self.cascades)


class TrackedSend:
    """Wraps ASGI `send` to know the status sent and whether the response is complete."""

    __slots__ = ("finished", "send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0
        self.finished = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not message.get("more_body"):
            self.finished = True
        await self.send(message)

    async def watch_disconnect(self, receive: Receive, scope: trio.CancelScope) -> None:
        """Cancel the request when the client goes away, even while nothing is being written.

        The server also reports a disconnect once a response is complete; that one is ignored.
        """
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected(scope)
                return

    def disconnected(self, scope: trio.CancelScope) -> None:
        """The client's stream closed: the request is cancelled unless its answer was complete
        (then the close is the server's end of the exchange)."""
        if not self.finished:
            scope.cancel()


def base_headers(request_id: str, content_type: bytes = JSON) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), (b"x-request-id", request_id.encode())]


def served_headers(winner: Winner) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"x-cascade-provider", winner.target.provider.encode()),
        (b"x-cascade-model", winner.target.model.encode()),
        (b"x-cascade-attempts", str(winner.attempt_count).encode()),
    ]
    if winner.skipped:  # targets that could not take this request (docs/dialects.md)
        headers.append((b"x-cascade-skipped", ", ".join(winner.skipped).encode()))
    return headers


async def respond(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    content_type: bytes = JSON,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    head_only: bool = False,
) -> None:
    headers = base_headers(request_id, content_type)
    headers.append((b"content-length", str(len(body)).encode()))
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else body})


async def answer(
    send: Send,
    winner: Winner,
    request_id: str,
    client: Dialect,
    upstream: Dialect,
    delivery: Delivery,
    request: ClientRequest,
) -> None:
    """Write a complete answer."""
    reply = winner.reply
    assert isinstance(reply, Response)
    delivery.target, delivery.answer = winner.target, reply
    content_type = reply.headers.get("content-type", "application/json").encode()
    extra = served_headers(winner)
    encoding = reply.headers.get("content-encoding")
    if encoding:  # asked for identity, but an upstream may compress anyway: say so
        extra.append((b"content-encoding", encoding.encode()))
    status, body = reply.status, reply.body
    if client is upstream:
        client.answered(request, body)
    else:
        try:
            body = translator(client, upstream).answer(request, body)
        except (ValueError, TypeError, AttributeError, KeyError):  # not the dialect's shape
            status, content_type = 502, JSON
            body = client.error_body(
                502,
                "the provider's answer is not a valid answer of its dialect",
                "upstream_error",
                "malformed_answer",
                request_id=request_id,
            )
    if status == 200 and delivery.on_whole is not None:
        await delivery.on_whole()
    await respond(send, status, body, request_id, content_type, extra)
    delivery.first_byte = trio.current_time()


# A resume (router/face/resuming.py): given how the stream failed (cut, stall, error_event),
# the continuation's winner and the writer to go on with, or None (the stream ends as it would)
Resume = Callable[[str], Awaitable[tuple[Winner, StreamWriter] | None]]


class _Stop:
    """How a relayed stream stopped: complete, or broken (`code`, `message`, and `kind`: what a
    resume answers to). `upstream_done`: the attempt has ended too."""

    __slots__ = ("code", "complete", "kind", "message", "upstream_done")

    def __init__(
        self, complete: bool, upstream_done: bool, code: str = "", message: str = "", kind: str = ""
    ) -> None:
        self.complete = complete
        self.upstream_done = upstream_done
        self.code = code
        self.message = message
        self.kind = kind


async def stream(
    send: Send,
    winner: Winner,
    request_id: str,
    writer: StreamWriter,
    tracked: Callable[[], AbstractContextManager[trio.CancelScope]],
    delivery: Delivery,
    resume: Resume | None = None,
) -> None:
    """Relay a committed stream; it ends complete or, on any failure, with an in-band error
    (unless `resume` continues it on another target)."""
    start = winner.reply
    assert isinstance(start, StreamStart)
    delivery.target = winner.target
    headers = base_headers(request_id, b"text/event-stream")
    headers += [(b"cache-control", b"no-cache"), *served_headers(winner)]
    await send({"type": "http.response.start", "status": start.status, "headers": headers})
    delivery.first_byte = trio.current_time()
    tail: list[bytes] = []  # written, not yet sent: it goes out with the ending
    stop = _first(writer, winner, delivery, tail)  # check_start refused an in-band error
    if stop is None:  # (a whole answer in its first events needs no cutoff scope)
        with tracked() as cutoff:
            stop = await _rest(send, writer, winner, delivery, tail)
            while not stop.complete and resume is not None:
                resumed = await resume(stop.kind)
                if resumed is None:
                    break
                winner, writer = resumed
                stop = _first(writer, winner, delivery, tail) or await _rest(
                    send, writer, winner, delivery, tail
                )
        if cutoff.cancelled_caught:  # nothing more to wait for: the attempt is cancelled
            stop = _Stop(False, True, "shutting_down", "the gateway is shutting down")
    if stop.complete:
        delivery.completed = True
        ending = writer.finish()
    else:
        ending = writer.fail(stop.message, stop.code)
    if delivery.completed and delivery.on_whole is not None:
        await delivery.on_whole()
    await send(
        {"type": "http.response.body", "body": b"".join([*tail, ending]), "more_body": False}
    )
    if not stop.upstream_done:
        await _upstream_end(winner, delivery)


async def _upstream_end(winner: Winner, delivery: Delivery) -> None:
    """The client has its end. Let the upstream finish its body, so the attempt ends as the
    success it was (the actor learns its latency, closes a probing circuit) instead of as a
    cancellation. Upstreams close right after their end; the bound covers those that do not."""
    with trio.move_on_after(_UPSTREAM_END_GRACE):
        try:
            while True:
                winner.demand.want()
                reply = await winner.replies.receive()
                if isinstance(reply, StreamEnd | Failed):
                    break
        except trio.ClosedResourceError:  # a resume tried has cancelled the attempt
            return
        if isinstance(reply, StreamEnd):
            delivery.usage = reply.usage


def _first(
    writer: StreamWriter, winner: Winner, delivery: Delivery, tail: list[bytes]
) -> _Stop | None:
    """A winner's first events written to `tail` (the first stream's, or a resumed stream's
    continuation's); how the stream stopped, if they end it."""
    start = winner.reply
    assert isinstance(start, StreamStart)
    delivery.target = winner.target
    if delivery.count is not None:
        delivery.content += delivery.count(start.events)
    data, error = writer.relay(start.events)
    tail.append(data)
    if error is not None:
        return _broken(error, False)
    return _Stop(True, False) if writer.done else None


async def _rest(
    send: Send, writer: StreamWriter, winner: Winner, delivery: Delivery, tail: list[bytes]
) -> _Stop:
    """Send what is written, then relay the rest of the winner's stream."""
    await send({"type": "http.response.body", "body": b"".join(tail), "more_body": True})
    tail.clear()
    return await _relay(send, writer, winner.replies, winner.demand, delivery, tail)


def _broken(error: str, upstream_done: bool) -> _Stop:
    """An in-band error event. A [DONE] before any finish_reason is the same failure as a body
    that ends early (the actor's tally counts it as such): one code for both."""
    if error == INCOMPLETE_STREAM.message:
        return _Stop(False, upstream_done, INCOMPLETE_STREAM.error_type, error, "cut")
    return _Stop(False, upstream_done, "upstream_stream_error", error, "error_event")


_STALLS = ("idle_timeout", "total_timeout")


async def _relay(
    send: Send,
    writer: StreamWriter,
    replies: trio.MemoryReceiveChannel[Reply],
    demand: Demand,
    delivery: Delivery,
    tail: list[bytes],
) -> _Stop:
    """Forward events until the stream ends, complete or broken.

    Events already queued when one arrives go out in the same write (coalescing); the events
    that belong with the ending are left in `tail`, to be written together with it.
    """
    while True:
        demand.want()  # what it took is written: the actor may read the upstream again
        try:  # (what is queued needs no scheduling round: the write below is one)
            batch = [replies.receive_nowait()]
        except trio.WouldBlock:
            batch = [await replies.receive()]
        _drain(replies, batch)
        upstream_done = isinstance(batch[-1], StreamEnd | Failed)
        out: list[bytes] = []
        for reply in batch:
            if isinstance(reply, StreamEvents):
                if delivery.count is not None:
                    delivery.content += delivery.count(reply.events)
                data, error = writer.relay(reply.events)
                out.append(data)
                if error is not None:
                    tail.extend(out)
                    return _broken(error, upstream_done)
                if writer.done:
                    tail.extend(out)
                    if isinstance(end := batch[-1], StreamEnd):  # already here: its usage too
                        delivery.usage = end.usage
                    return _Stop(True, upstream_done)
            elif isinstance(reply, StreamEnd):
                tail.extend(out)
                delivery.usage = reply.usage
                return _Stop(True, True)  # complete (the actor judged): [DONE] if missing
            elif isinstance(reply, Failed):
                tail.extend(out)
                delivery.usage = reply.usage  # what the upstream reported before it failed
                failure = reply.failure
                message = f"the upstream stream failed after it began: {failure.message}"
                kind = "stall" if failure.error_type in _STALLS else "cut"
                return _Stop(False, True, failure.error_type, message, kind)
        await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})


def _drain(replies: trio.MemoryReceiveChannel[Reply], batch: list[Reply]) -> None:
    """Coalescing: add the replies already queued, so they leave in one write.

    It does not wait for more: a scheduling round per batch to let the actor read the rest of a
    burst cost as much as the writes it saved, and delayed every event behind it (p99 gap
    between events at c=64: 14.5 ms with four such rounds, 8.5 ms without)."""
    while not isinstance(batch[-1], StreamEnd | Failed):
        try:
            batch.append(replies.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return


async def cascade_error(
    send: Send, exc: CascadeError, request_id: str, client: Dialect, upstream: Dialect
) -> None:
    extra = [(b"x-cascade-attempts", str(exc.calls).encode())]
    if exc.retry_after is None:
        # Cascade has retried what could be retried: the SDKs' own retries (two by default, on
        # 408/409/429/5xx) would only run the whole cascade again. Every target rate limited,
        # with a known end, is the exception: waiting Retry-After and trying again is right.
        extra.append((b"x-should-retry", b"false"))
    if exc.upstream is not None and upstream is client:  # the provider's own error, as it is
        answer = exc.upstream
        content_type = answer.headers.get("content-type", "application/json").encode()
        await respond(send, answer.status, answer.body, request_id, content_type, extra)
        return
    if exc.upstream is not None:  # from a provider of the other dialect: in the client's shape
        status = exc.upstream.status
        message = translate.error_message(exc.upstream.body)
        body = client.error_body(status, message, exc.error_type, request_id=request_id)
        await respond(send, status, body, request_id, extra=extra)
        return
    if exc.retry_after is not None:
        extra.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    body = client.error_body(
        exc.status,
        exc.message,
        exc.error_type,
        exc.code,
        exc.param,
        request_id=request_id,
        attempts=[a.to_json() for a in exc.attempts],
    )
    await respond(send, exc.status, body, request_id, extra=extra)
